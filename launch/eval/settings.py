"""What `loom eval` measures and how big: the metric families, the sizes (two named profiles, `spec` and
`quick`, and the `--set` knobs on top), and their parsing. The metrics are defined in docs/techniques.md,
each technique's "Evaluation metrics"."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

FAMILIES: dict[str, str] = {
    "loss": "held-out loss and perplexity on packed held-out samples (SCA metric 4, HCMA metric 5)",
    "ppl_f": "perplexity fluctuation PPL-F and its CV over 128-token windows (LCM metric 1)",
    "entropy": "teacher-forced sequence entropy H̄: mean and variance over sequences (SCR metric 1)",
    "generation": "greedy generations: entropy variance EV, lexical instability LI, rep-4, distinct-2, "
    "sentence-length std, generation ms/token (LCM metrics 2-3, SCR metric 1)",
    "drift": "latent drift 1 - cos(h^L_t, h^L_t-1) (LCM metric 4)",
    "repvar": "representation variability per layer (SCR metric 2)",
    "ahd": "cross-layer attention-head deviation and within-layer head dispersion, JS divergence (SCR metric 3)",
    "persistence": "context-persistence gain NLL(2nd half | none) - NLL(2nd half | 1st half) (SCR metric 4)",
    "kv_recall": "key-value recall against length: greedy exact match, teacher-forced accuracy, ms/token "
    "(CMR metric 1, HCMA metric 3)",
    "rare_recall": "recall of tokens whose previous occurrence is far back, per training-frequency bucket "
    "(CMR metric 2)",
    "numerical": "numerical-reasoning probes: accuracy and paraphrase consistency (CMR metric 3)",
    "multiturn": "multi-turn context-utilisation gain against the number of turns (CMR metric 4, a proxy)",
    "coherence": "chunk coherence score Coh and CohMargin at the SCA layer and the last layer (SCA metric 1)",
    "collapse": "effective rank and anisotropy per layer (SCA metric 2)",
    "rare_words": "NLL on targets with training frequency <= 100 and rare-token self-consistency (SCA metric 3)",
    "retrieval": "next-token retrieval@1/@10 per frequency bucket, by logits and by cosine (HCMA metric 1)",
    "robustness": "token substitution dNLL and top-1 agreement; L2 FGSM top-1 drop (HCMA metric 2)",
    "geometry": "embedding table: silhouette of fine clusters, kNN@10 overlap with a reference table, low-density "
    "fraction (HCMA metric 4)",
    "smoothness": "grad-norm CV over 100-step windows and spike count, from every step's logged norm (LCM metric 5)",
    "overhead": "training tokens/s, step time, memory (from the run's logs) and inference ms/token (LCM metric 6, ...)",
}
DOC_PASS_FAMILIES = {
    "ppl_f",
    "entropy",
    "drift",
    "repvar",
    "coherence",
    "collapse",
    "rare_words",
    "retrieval",
    "rare_recall",
    "overhead",
}
"""Families computed from the teacher-forced pass over whole held-out documents."""
HIDDEN_FAMILIES = {"drift", "repvar", "coherence", "collapse", "rare_words"}
"""Families that need the hidden states of that pass (captured by hooks, which cost memory)."""
COUNT_FAMILIES = {"rare_recall", "retrieval", "rare_words"}
"""Families bucketed by training-token frequency."""
RUN_LOG_FAMILIES = {"smoothness", "overhead"}
"""Families read (partly) from the run's TensorBoard logs."""


@dataclass
class EvalSettings:
    """Sizes and knobs of `loom eval`: the defaults are the `spec` profile (docs/techniques.md's sizes);
    `--profile quick` swaps in CPU sizes (`PROFILES`) and `--set key=value` overrides single knobs."""

    profile: str = "spec"
    """The named profile these settings started from (`spec` or `quick`); --set items may change single knobs."""
    seed: int = 0
    batch_size: int = 8
    """Sequences per forward pass."""
    max_stream_tokens: int = 4_000_000
    """Held-out tokens read from the data source (documents and probe filler come from these)."""
    max_docs: int = 64
    """Held-out documents in the teacher-forced document pass."""
    min_doc_tokens: int = 2048
    """Documents shorter than this (or than the context) are not used for document metrics (PPL-F: N >= 2048)."""
    max_doc_tokens: int = 4096
    """Documents are cut to this many tokens."""
    doc_segments: int = 1
    """Up to this many consecutive max_doc_tokens segments per long document (for held-out sets with
    few, long documents); segments of one document never count as different documents."""
    doc_stride: int = 0
    """Stride of the sliding context windows over long documents; 0 means seq_length / 2."""
    heldout_samples: int = 256
    """Packed samples of seq_length + 1 tokens for the held-out loss."""
    ppl_window: int = 128
    """PPL-F window W (tokens)."""
    ppl_stride: int = 64
    """PPL-F window stride."""
    gen_prompts: int = 64
    """Prompts of the generation metrics (the definitions fix a prompt set, not its size)."""
    gen_prompt_tokens: int = 32
    gen_tokens: int = 512
    """Generated tokens per prompt (G)."""
    ahd_rows: int = 16
    """Sequences whose attention maps AHD reads."""
    ahd_queries: int = 64
    """Queries subsampled per sequence for AHD."""
    persistence_multiples: str = "1,2"
    """Segment lengths for the persistence gain, as multiples of seq_length."""
    kv_lengths: str = "500,1000,1500,2000,2500,2x,4x"
    """Key-value probe lengths in tokens; "Nx" means N times seq_length."""
    kv_samples: int = 500
    """Probes per length."""
    kv_facts: int = 8
    """Facts M inserted into each key-value probe."""
    num_lengths: str = "500,1000,1500,2000,2500"
    """Numerical-reasoning probe lengths in tokens."""
    num_samples: int = 500
    """Numerical probes per length (as many as key-value probes; the definition gives no count)."""
    multiturn_ks: str = "2,4,6,8,10"
    multiturn_dialogues: int = 64
    turn_tokens: int = 24
    """Tokens per turn (paragraphs of the held-out text cut to this length)."""
    rare_gap: int = 256
    """Minimum distance back to the previous occurrence; 0 means min(256, seq_length / 2)."""
    rare_max_frequency: int = 100
    coh_chunk: int = 128
    erank_tokens: int = 16384
    anisotropy_pairs: int = 4096
    robust_rows: int = 64
    robust_fraction: float = 0.05
    fgsm_eps: float = 0.01
    knn_k: int = 10
    reference: str = ""
    """Checkpoint whose input embedding is the "before alignment" table for kNN overlap (`loom study` passes
    the same seed's baseline); empty means the run's own initial (step-0) table, named as such in the results."""
    smooth_window: int = 100


PROFILES: dict[str, dict[str, object]] = {
    "spec": {},
    "quick": {
        "max_stream_tokens": 300_000,
        "max_docs": 16,
        "min_doc_tokens": 256,
        "max_doc_tokens": 1024,
        "heldout_samples": 64,
        "gen_prompts": 8,
        "gen_tokens": 64,
        "ahd_rows": 4,
        "kv_lengths": "500,1000,2x,4x",
        "kv_samples": 8,
        "num_lengths": "500",
        "num_samples": 12,
        "multiturn_dialogues": 8,
        "rare_gap": 0,
        "robust_rows": 8,
    },
}
"""`spec`: the sizes docs/techniques.md's metrics ask for (documents of N >= 2048 tokens, G = 512 generated
tokens, 500 key-value probes at 500-2500 tokens and 2x/4x the context, numerical probes at 500-2500, a
256-token rare gap); hours on a CPU. `quick`: a small model in about a minute on a CPU (tests, quickstart)."""


def parse_settings(items: list[str], profile: str = "spec") -> EvalSettings:
    """The `profile`'s settings with the `--set KEY=VALUE` items applied on top."""
    if profile not in PROFILES:
        raise ValueError(f"unknown eval profile {profile!r}; known: {', '.join(PROFILES)}")
    settings = EvalSettings(profile=profile, **PROFILES[profile])
    types = {f.name: f.type for f in fields(EvalSettings) if f.name != "profile"}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key not in types:
            raise ValueError(f"unknown eval setting {key!r}; known: {', '.join(sorted(types))}")
        kind = {"int": int, "float": float, "str": str}[str(types[key]).replace("<class '", "").replace("'>", "")]
        setattr(settings, key, kind(value))
    return settings


def profile_overrides(settings: EvalSettings) -> dict[str, object]:
    """The knobs of `settings` that differ from its profile's (the `--set` items that changed something)."""
    base = asdict(parse_settings([], settings.profile))
    return {key: value for key, value in asdict(settings).items() if value != base[key]}


def parse_families(text: str | None) -> list[str]:
    if not text or text == "all":
        return list(FAMILIES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    return names


def parse_lengths(text: str, seq_length: int) -> list[int]:
    """Comma-separated token counts; "Nx" is N times `seq_length`."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item:
            out.append(int(float(item[:-1]) * seq_length) if item.endswith("x") else int(item))
    return out


def batches_of(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
