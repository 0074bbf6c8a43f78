"""What `loom eval` measures and how big: the metric families, the `--set` knobs, and their parsing."""

from __future__ import annotations

from dataclasses import dataclass, fields

FAMILIES: dict[str, str] = {
    "loss": "held-out loss and perplexity on packed held-out samples (§6.14 m4, §7.14 m5)",
    "ppl_f": "perplexity fluctuation PPL-F and its CV over 128-token windows (§3.14 m1)",
    "entropy": "teacher-forced sequence entropy H̄: mean and variance over sequences (§4.14 m1)",
    "generation": "greedy generations: entropy variance EV, lexical instability LI, rep-4, distinct-2, "
    "sentence-length std, generation ms/token (§3.14 m2-3, §4.14 m1)",
    "drift": "latent drift 1 - cos(h^L_t, h^L_t-1) (§3.14 m4)",
    "repvar": "representation variability per layer (§4.14 m2)",
    "ahd": "cross-layer attention-head deviation and within-layer head dispersion, JS divergence (§4.14 m3)",
    "persistence": "context-persistence gain NLL(2nd half | none) - NLL(2nd half | 1st half) (§4.14 m4)",
    "kv_recall": "key-value recall against length: greedy exact match, teacher-forced accuracy, ms/token "
    "(§5.14 m1, §7.14 m3)",
    "rare_recall": "recall of tokens whose previous occurrence is far back, per training-frequency bucket (§5.14 m2)",
    "numerical": "numerical-reasoning probes: accuracy and paraphrase consistency (§5.14 m3)",
    "multiturn": "multi-turn context-utilisation gain against the number of turns (§5.14 m4 proxy)",
    "coherence": "chunk coherence score Coh and CohMargin at the SCA layer and the last layer (§6.14 m1)",
    "collapse": "effective rank and anisotropy per layer (§6.14 m2)",
    "rare_words": "NLL on targets with training frequency <= 100 and rare-token self-consistency (§6.14 m3)",
    "retrieval": "next-token retrieval@1/@10 per frequency bucket, by logits and by cosine (§7.14 m1)",
    "robustness": "token substitution dNLL and top-1 agreement; L2 FGSM top-1 drop (§7.14 m2)",
    "geometry": "embedding table: silhouette of fine clusters, kNN@10 overlap, low-density fraction (§7.14 m4)",
    "smoothness": "grad-norm CV over 100-step windows and spike count, from the run's logs (§3.14 m5)",
    "overhead": "training tokens/s, step time, memory (from the run's logs) and inference ms/token (§3.14 m6 ...)",
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
    """Sizes and knobs of `loom eval` (set with `--set key=value`)."""

    seed: int = 0
    batch_size: int = 8
    """Sequences per forward pass."""
    max_stream_tokens: int = 300_000
    """Held-out tokens read from the data source (documents and probe filler come from these)."""
    max_docs: int = 16
    """Held-out documents in the teacher-forced document pass."""
    min_doc_tokens: int = 256
    """Documents shorter than this (or than the context) are not used for document metrics."""
    max_doc_tokens: int = 1024
    """Documents are cut to this many tokens (the spec asks N >= 2048 for PPL-F)."""
    doc_segments: int = 1
    """Up to this many consecutive max_doc_tokens segments per long document (for held-out sets with
    few, long documents); segments of one document never count as different documents."""
    doc_stride: int = 0
    """Stride of the sliding context windows over long documents; 0 means seq_length / 2."""
    heldout_samples: int = 64
    """Packed samples of seq_length + 1 tokens for the held-out loss."""
    ppl_window: int = 128
    ppl_stride: int = 64
    gen_prompts: int = 8
    gen_prompt_tokens: int = 32
    gen_tokens: int = 64
    """Generated tokens per prompt (the spec's G = 512)."""
    ahd_rows: int = 4
    ahd_queries: int = 64
    persistence_multiples: str = "1,2"
    """Segment lengths for the persistence gain, as multiples of seq_length."""
    kv_lengths: str = "500,1000,2x,4x"
    """Key-value probe lengths in tokens; "Nx" means N times seq_length (spec: 500..2500, 2x, 4x)."""
    kv_samples: int = 8
    """Probes per length (the spec's 500)."""
    kv_facts: int = 8
    num_lengths: str = "500"
    num_samples: int = 12
    multiturn_ks: str = "2,4,6,8,10"
    multiturn_dialogues: int = 8
    turn_tokens: int = 24
    """Tokens per turn (paragraphs of the held-out text cut to this length)."""
    rare_gap: int = 0
    """Minimum distance back to the previous occurrence (spec 256); 0 means min(256, seq_length / 2)."""
    rare_max_frequency: int = 100
    coh_chunk: int = 128
    erank_tokens: int = 16384
    anisotropy_pairs: int = 4096
    robust_rows: int = 8
    robust_fraction: float = 0.05
    fgsm_eps: float = 0.01
    knn_k: int = 10
    reference: str = ""
    """Checkpoint whose input embedding is the "before alignment" table for kNN overlap; empty
    means the run's initial (step-0) table, regenerated from its seed."""
    smooth_window: int = 100


def parse_settings(items: list[str]) -> EvalSettings:
    settings = EvalSettings()
    types = {f.name: f.type for f in fields(EvalSettings)}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key not in types:
            raise ValueError(f"unknown eval setting {key!r}; known: {', '.join(sorted(types))}")
        kind = {"int": int, "float": float, "str": str}[str(types[key]).replace("<class '", "").replace("'>", "")]
        setattr(settings, key, kind(value))
    return settings


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
