"""`loom eval`: held-out loss and every evaluation metric of TECHNIQUES.md on a checkpoint.

The checkpoint's network is rebuilt at its own tensor/pipeline layout (`meta.json` holds the
resolved run config and the layout) and its weights are read from the DeepSpeed model-state file
of each model-parallel rank (`ds/state/mp_rank_XX_model_states.pt`, `XX = pp_rank·tp + tp_rank`;
written by ZeRO 0-2 whatever the data-parallel size). Run it as one process for TP = PP = 1, or
under torchrun with any multiple of TP×PP processes: the extra factor is data parallelism over
documents, probes and prompts. Every forward goes through the pipeline (`forward_only`), logits
stay vocab-parallel (`techniques.metrics.entropy` does the M/S/U reductions over the TP group),
hidden states and attention maps are read by hooks on the stage that owns the layer, and all
per-rank records are gathered to global rank 0, which computes the metrics with the pure
functions of `techniques.metrics` and writes JSON and TensorBoard scalars.

Metric families (`--metrics`, default all; `loom eval --list` describes them) are listed in
`FAMILIES`. Sizes default to a few documents and short generations so a small model evaluates in
about a minute on a CPU; `--set KEY=VALUE` scales every knob of `EvalSettings` (e.g.
`--set gen_tokens=512 kv_samples=500` for the spec's sizes).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from techniques.metrics import (attention as attn_m, entropy as ent_m, geometry as geo_m, lexical as lex_m,
                                optimization as opt_m, perplexity as ppl_m, recall as rec_m,
                                representation as rep_m, robustness as rob_m)

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
_DOC_PASS = {"ppl_f", "entropy", "drift", "repvar", "coherence", "collapse", "rare_words", "retrieval",
             "rare_recall", "overhead"}
_HIDDEN = {"drift", "repvar", "coherence", "collapse", "rare_words"}


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


def _lengths(text: str, seq_length: int) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if item:
            out.append(int(float(item[:-1]) * seq_length) if item.endswith("x") else int(item))
    return out


def log0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# ----------------------------------------------------------------------------- checkpoint
def run_config_from_meta(config: dict):
    """The checkpoint's resolved RunConfig (unknown keys from newer/older versions are dropped)."""
    from omegaconf import OmegaConf

    from launch.config import RunConfig, _known_keys

    known = _known_keys(RunConfig)

    def prune(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if path not in known:
                continue
            out[key] = prune(value, path + ".") if isinstance(value, dict) and value and \
                not isinstance(getattr(known[path], "default", None), (dict, list)) else value
        return out

    schema = OmegaConf.structured(RunConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, prune(config)))


def resolve_checkpoint_dir(path: str) -> Path:
    """A checkpoint folder, or a run directory / its checkpoints folder (then the `latest` one)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / "meta.json").is_file():
                return cand
    raise FileNotFoundError(f"{path} is not a Loom checkpoint (no meta.json) nor a run directory with one")


class EvalModel:
    """This rank's pipeline stage of the checkpoint, in eval mode, plus the process groups."""

    def __init__(self, folder: Path):
        from megatron.core import parallel_state as ps

        from model.parallel import cpu_compat
        from model.parallel.config import ParallelConfig
        from model.parallel.groups import init_parallel_groups
        from model.parallel.parallelize import build_stage, default_device, resolve_dtype

        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.cfg = run_config_from_meta(self.meta["config"])
        lay = self.meta.get("layout", {})
        tp, pp = int(lay.get("tp", self.cfg.parallel.tensor)), int(lay.get("pp", self.cfg.parallel.pipeline))
        if int(lay.get("zero", self.cfg.parallel.zero_stage)) == 3:
            raise ValueError(f"{folder}: ZeRO-3 checkpoints keep the weights partitioned over data-parallel ranks; "
                             f"`loom eval` reads ZeRO 0-2 checkpoints (consolidate a ZeRO-3 one first)")
        world = dist.get_world_size()
        if world % (tp * pp):
            raise ValueError(f"the checkpoint has TP={tp} × PP={pp}: run `loom eval` with a multiple of {tp * pp} "
                             f"processes (got {world})")
        cpu_compat.apply()
        self.layout = init_parallel_groups(ParallelConfig(tensor=tp, pipeline=pp, zero_stage=0,
                                                          timeout_s=self.cfg.parallel.timeout_s))
        self.device = default_device()
        self.dtype = resolve_dtype(self.cfg.train.precision)
        self.module = build_stage(self.cfg.model, self.cfg.techniques, self.layout, self.cfg.train.seed, self.dtype,
                                  self.device)
        mp = self.layout.pp_rank * tp + self.layout.tp_rank
        state_file = folder / "ds" / "state" / f"mp_rank_{mp:02d}_model_states.pt"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} is missing: not a complete ZeRO 0-2 checkpoint")
        state = torch.load(state_file, map_location="cpu", weights_only=False)["module"]
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{state_file}: weights do not match the config (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.seq_length = self.cfg.model.seq_length
        self.step = int(self.meta.get("state", {}).get("step", 0))
        self.last_stage_rank = dist.get_global_rank(self.pp_group, dist.get_world_size(self.pp_group) - 1)
        if self.module.is_last:
            w = self.module.output_layer.weight
            if w is None:
                w = self.module.embedding.weight
            self.vocab_start = self.layout.tp_rank * w.shape[0]
            self.column_scale = 1.0 / w.float().norm(dim=-1).clamp_min(1e-12)

    # ---------------------------------------------------------------- ownership
    @property
    def reports_stats(self) -> bool:
        """Last stage, TP rank 0: owns the per-token statistics of its replica."""
        return self.module.is_last and self.layout.tp_rank == 0

    @property
    def reports_hidden(self) -> bool:
        return self.layout.tp_rank == 0

    def points(self) -> list[int]:
        """Residual points h^ℓ this stage produces (0 = embedding output)."""
        pts = [i + 1 for i in self.module.layer_range]
        return ([0] if self.module.is_first else []) + pts

    # ---------------------------------------------------------------- forwards
    def forward(self, rows, capture: bool = False, embed_delta=None) -> tuple[Optional[dict], dict]:
        """Teacher-forced pass of `rows [b, s+1]`. Returns (per-token stats `[b, s]` on the reporting
        rank else None, {point: hidden [b, s, d]} for this stage's points when `capture`)."""
        module = self.module
        tokens = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.device)
        b, s = tokens.shape[0], tokens.shape[1] - 1
        captured: dict[int, torch.Tensor] = {}
        handles = []
        if capture:
            if module.is_first:
                handles.append(module.embedding.register_forward_hook(
                    lambda m, i, o: captured.__setitem__(0, o.detach().float().transpose(0, 1))))
            for idx, block in module.layers.items():
                handles.append(block.register_forward_hook(
                    lambda m, i, o, p=int(idx) + 1: captured.__setitem__(p, o.detach().float().transpose(0, 1))))
        if embed_delta is not None and module.is_first:
            handles.append(module.embedding.register_forward_hook(lambda m, i, o: embed_delta(o)))

        def stage_forward(mb, received):
            out = module(mb, received, update_ema=False, return_logits=True)
            if not module.is_last:
                return out
            return self.token_stats(out, mb[:, 1:])

        from model.parallel.pipeline import forward_only

        try:
            outs = forward_only(stage_forward, [tokens], self.pp_group, module.carry_specs(b, s, self.dtype),
                                self.device)
        finally:
            for h in handles:
                h.remove()
        stats = outs[0] if (outs and self.reports_stats) else None
        return stats, captured

    def token_stats(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        out = ent_m.vocab_parallel_token_stats(logits, labels.t(), self.vocab_start, self.tp_group,
                                               column_scale=self.column_scale)
        return {k: v.t().cpu() for k, v in out.items()}

    @torch.no_grad()
    def generate(self, prompts, new_tokens: int, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Greedy continuation of equal-length `prompts [b, P]` (no early stop, no KV cache): the
        ids and the full-vocabulary entropies `[b, new_tokens]`, identical on every rank of the
        replica. `limit` keeps only the last `limit` tokens as context (None: no limit)."""
        from model.parallel.pipeline import forward_only

        module = self.module
        seq = torch.as_tensor(np.asarray(prompts), dtype=torch.long, device=self.device)
        b = seq.shape[0]
        ids = torch.zeros(b, new_tokens, dtype=torch.long)
        ents = torch.zeros(b, new_tokens, dtype=torch.float64)
        for t in range(new_tokens):
            window = seq if limit is None else seq[:, -limit:]
            tokens = torch.cat([window, window[:, -1:]], dim=1)  # the label column is unused

            def stage_forward(mb, received):
                out = module(mb, received, update_ema=False, return_logits=True)
                if not module.is_last:
                    return out
                last = out[-1]  # [b, V/tp]
                return torch.stack([ent_m.vocab_parallel_argmax(last, self.vocab_start, self.tp_group).double(),
                                    ent_m.vocab_parallel_entropy(last, self.tp_group).double()])

            outs = forward_only(stage_forward, [tokens], self.pp_group,
                                module.carry_specs(b, window.shape[1], self.dtype), self.device)
            result = outs[0] if outs else torch.zeros(2, b, dtype=torch.float64, device=self.device)
            if dist.get_world_size(self.pp_group) > 1:
                dist.broadcast(result, src=self.last_stage_rank, group=self.pp_group)
            next_ids = result[0].long()
            ids[:, t], ents[:, t] = next_ids.cpu(), result[1].cpu()
            seq = torch.cat([seq, next_ids[:, None].to(self.device)], dim=1)
        return ids.numpy(), ents.numpy()

    def full_embedding_table(self) -> Optional[torch.Tensor]:
        """The real rows of the input embedding, gathered over TP on the first stage (else None).
        Collective over the first stage's TP group."""
        if not self.module.is_first:
            return None
        w = self.module.embedding.weight.detach().float()
        if self.layout.tp > 1:
            parts = [torch.empty_like(w) for _ in range(self.layout.tp)]
            dist.all_gather(parts, w, group=self.tp_group)
            w = torch.cat(parts)
        return w[: self.cfg.model.vocab_size].cpu()


# -------------------------------------------------------------------------------- data
@dataclass
class Heldout:
    stream: np.ndarray
    """Held-out token ids, documents separated by EOS."""
    docs: list
    """Selected documents (token arrays without EOS) for the document pass."""
    filler: np.ndarray
    """The stream without EOS tokens (probe filler)."""
    words: list
    source: str
    doc_source: list
    """Index of the source document of each entry of `docs` (segments of one document share it)."""


def _split_docs(stream: np.ndarray, eos: int, complete_tail: bool) -> list[np.ndarray]:
    cuts = np.flatnonzero(stream == eos)
    docs, prev = [], 0
    for c in cuts:
        docs.append(stream[prev:c])
        prev = c + 1
    if complete_tail and prev < len(stream):
        docs.append(stream[prev:])
    return [d for d in docs if len(d)]


def read_heldout(source: str, tokenizer, settings: EvalSettings, cache_dir: Optional[str], log=print) -> tuple[np.ndarray, str]:
    """Token stream of `source`: a shard manifest (or its folder; the `val` split when present),
    a built-in corpus name, or text files (.txt/.jsonl/.jsonl.gz, globs, folders)."""
    from data.corpora import CORPORA, ensure_corpus, iter_documents
    from data.manifest import check_compatible, load_manifest, shard_urls
    from data.shard_reader import read_shard

    limit = settings.max_stream_tokens
    path = Path(source)
    is_manifest = source.endswith(".json") or (path.is_dir() and ((path / "manifest.json").is_file()
                                                                   or (path / "val" / "manifest.json").is_file()))
    if is_manifest or "://" in source or source.startswith("pipe:"):
        manifest = load_manifest(source, split="val")
        check_compatible(manifest, tokenizer_sha256=tokenizer.sha256)
        parts, total = [], 0
        for url, info in zip(shard_urls(manifest), manifest.shards):
            arr = read_shard(url, info, manifest).reshape(-1).astype(np.int64)
            parts.append(arr)
            total += arr.size
            if total >= limit:
                break
        return np.concatenate(parts)[:limit], f"manifest {manifest.location}"
    if source in CORPORA:
        files = ensure_corpus(source, cache_dir)
        label = f"corpus {source}"
    else:
        files = source
        label = f"text {source}"
    parts, total = [], 0
    for text in iter_documents(files):
        ids = tokenizer.encode(text, eos=True)
        parts.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= limit:
            break
    if not parts:
        raise ValueError(f"no documents in {source}")
    return np.concatenate(parts), label


def select_heldout(stream: np.ndarray, tokenizer, label: str, settings: EvalSettings, seq_length: int,
                   from_manifest: bool) -> Heldout:
    eos = tokenizer.eos_id
    docs = _split_docs(stream, eos, complete_tail=True)  # a manifest's last document may be cut: still real text
    min_len = max(settings.min_doc_tokens, seq_length)
    # a long document gives up to `doc_segments` consecutive segments of max_doc_tokens; segments
    # keep their source document's index, so cross-document statistics never pair a document with itself
    segments = []
    for i, d in enumerate(docs):
        for k in range(max(1, settings.doc_segments)):
            seg = d[k * settings.max_doc_tokens:(k + 1) * settings.max_doc_tokens]
            if len(seg) >= min_len:
                segments.append((i, seg))
    rng = random.Random(settings.seed)
    chosen = sorted(rng.sample(range(len(segments)), min(settings.max_docs, len(segments))))
    filler = stream[stream != eos]
    words = rec_m.key_words(tokenizer.decode(filler[:60000].tolist()))
    return Heldout(stream=stream, docs=[segments[i][1] for i in chosen], filler=filler, words=words, source=label,
                   doc_source=[segments[i][0] for i in chosen])


def training_token_counts(train_source: Optional[str], vocab_size: int, log=print) -> Optional[np.ndarray]:
    """Token frequencies on the tokenized training corpus (§2.2), from its shard manifest."""
    if not train_source:
        return None
    from data.manifest import load_manifest, shard_urls
    from data.shard_reader import read_shard

    try:
        manifest = load_manifest(train_source, split="train")
    except (OSError, ValueError) as exc:
        log(f"warning: no training-frequency buckets: {exc}")
        return None
    counts = np.zeros(vocab_size, dtype=np.int64)
    for url, info in zip(shard_urls(manifest), manifest.shards):
        arr = read_shard(url, info, manifest).reshape(-1)
        counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
    return counts


def _encoder(tokenizer):
    """`encode` for text that continues running text: drops the lone dummy-prefix piece that
    SentencePiece puts in front of a string starting with a space."""
    lone = {i for i in range(min(tokenizer.vocab_size, 4096)) if tokenizer.id_to_piece(i) == "\u2581"}

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        if text.startswith(" ") and ids and ids[0] in lone:
            ids = ids[1:]
        return ids

    return encode


_STOPWORDS = {"the", "a", "an", "of", "to", "and", "or", "in", "on", "is", "it", "that", "this", "as", "for",
              "with", "be", "by", "at", "from"}


def non_content_positions(ids, tokenizer) -> list[int]:
    """Positions of "non-content" tokens (punctuation, whitespace, byte pieces, stopwords): the
    candidates for LI's one-token prompt perturbation (§3.14 metric 3)."""
    out = []
    for i, t in enumerate(ids):
        piece = tokenizer.id_to_piece(int(t)).replace("\u2581", "").strip()
        if not piece or piece.startswith("<0x") or not any(c.isalnum() for c in piece) or piece.lower() in _STOPWORDS:
            out.append(i)
    return out


# ------------------------------------------------------------------------------- evaluation
def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Evaluator:
    def __init__(self, model: EvalModel, tokenizer, held: Heldout, counts: Optional[np.ndarray],
                 settings: EvalSettings, families: list[str]):
        self.m, self.tok, self.held, self.counts = model, tokenizer, held, counts
        self.s, self.families = settings, families
        self.L = model.cfg.model.num_layers
        self.seq = model.seq_length
        self.dp_rank, self.dp = model.layout.dp_rank, model.layout.dp
        self.encode = _encoder(tokenizer)
        self.records: dict[str, Any] = {}
        self.notes: list[str] = []
        self.rare_gap = settings.rare_gap or min(256, self.seq // 2)
        sca_points = model.cfg.techniques.sca.resolved_layers(self.L)
        self.sca_layer = sca_points[0] if sca_points else self.L // 2

    def mine(self, n: int) -> list[int]:
        """Item indices of this data-parallel replica."""
        return [i for i in range(n) if i % self.dp == self.dp_rank]

    def record(self, key: str, value) -> None:
        self.records.setdefault(key, []).append(value)

    # ---------------------------------------------------------------- held-out loss
    def heldout_loss(self) -> None:
        stream, s = self.held.stream, self.seq
        n = min(self.s.heldout_samples, len(stream) // (s + 1))
        samples = stream[: n * (s + 1)].reshape(n, s + 1)
        total = np.zeros(2)
        for chunk in _batches(self.mine(n), self.s.batch_size):
            stats, _ = self.m.forward(samples[chunk])
            if stats is not None:
                total += [float(stats["nll"].double().sum()), stats["nll"].numel()]
        if self.m.reports_stats:
            self.record("loss", total.tolist())

    # ---------------------------------------------------------------- document pass
    def document_pass(self, capture: bool) -> None:
        s = self.seq
        stride = self.s.doc_stride or max(1, s // 2)
        eos = self.tok.eos_id
        items = []
        for d in self.mine(len(self.held.docs)):
            z = np.concatenate([[eos], self.held.docs[d]])
            for start, keep in ppl_m.plan_windows(len(z) - 1, s, stride):
                items.append((d, start, keep))
        per_doc: dict[int, dict[str, list]] = {}
        hidden: dict[tuple[int, int], list] = {}
        t0, n_tokens = time.perf_counter(), 0
        for chunk in _batches(items, self.s.batch_size):
            rows = []
            for d, start, _ in chunk:
                z = np.concatenate([[eos], self.held.docs[d]])
                rows.append(z[start:start + s + 1])
            stats, captured = self.m.forward(np.stack(rows), capture=capture)
            n_tokens += len(rows) * s
            for r, (d, start, keep) in enumerate(chunk):
                if stats is not None:
                    rec = per_doc.setdefault(d, {k: [] for k in ("nll", "entropy", "rank", "rank_cos", "argmax",
                                                                 "target", "gap", "input")})
                    for key in ("nll", "entropy", "rank", "rank_cos", "argmax"):
                        rec[key].append(stats[key][r, keep:].numpy())
                    rec["target"].append(rows[r][1 + keep:])
                    rec["input"].append(rows[r][keep:-1])
                    rec["gap"].append(rec_m.long_gap_mask(rows[r], self.rare_gap)[keep:])
                for point, h in captured.items():
                    hidden.setdefault((d, point), []).append(h[r, keep:].cpu())
        elapsed = time.perf_counter() - t0
        if self.m.reports_stats:
            self.record("tf_ms_per_token", (elapsed * 1000.0, n_tokens))
            for d, rec in per_doc.items():
                self.record("doc", (d, {k: np.concatenate(v) for k, v in rec.items()}))
        if capture and self.m.reports_hidden:
            self._summarise_hidden(hidden)

    def _summarise_hidden(self, hidden: dict) -> None:
        eos = self.tok.eos_id
        n_docs = max(1, len(self.held.docs))
        per_doc_rows = max(2, self.s.erank_tokens // n_docs)
        rare_cut = self.s.rare_max_frequency
        for (d, point), parts in hidden.items():
            h = torch.cat(parts).double()  # [N, d]: input positions 0..N-1 of z = [EOS] + doc
            tokens = np.concatenate([[eos], self.held.docs[d]])[: h.shape[0]]
            h_doc, tok_doc = h[1:], tokens[1:]  # drop the EOS position
            out: dict[str, Any] = {"repvar": rep_m.representation_variability(h_doc)}
            if point == self.L:
                start = torch.zeros(h_doc.shape[0], dtype=torch.bool)
                start[0] = True
                out["drift"] = rep_m.latent_drift(h_doc, start)
                if self.counts is not None:
                    freq = rec_m.frequency_of(tok_doc, self.counts)
                    rare = np.flatnonzero(freq <= rare_cut)
                    out["rare_states"] = (tok_doc[rare].tolist(), h_doc[rare].float())
            if point in (self.sca_layer, self.L):
                out["chunks"] = rep_m.chunk_means(h_doc, self.s.coh_chunk).float()
            pick = np.linspace(0, h_doc.shape[0] - 1, num=min(per_doc_rows, h_doc.shape[0])).astype(int)
            out["sample"] = h_doc[pick].float()
            self.record("hidden", (d, point, out))

    # ---------------------------------------------------------------- generation
    def generation(self) -> None:
        docs, P = self.held.docs, self.s.gen_prompt_tokens
        eos = self.tok.eos_id
        n = min(self.s.gen_prompts, len(docs))
        mine = self.mine(n)
        if not mine:
            return
        prompts, perturbed = [], []
        for i in mine:
            body = docs[i][:P].tolist()
            prompts.append([eos] + body)
            cands = non_content_positions(body, self.tok) or list(range(len(body)))
            drop = random.Random(f"li-{self.s.seed}-{i}").choice(cands)
            perturbed.append([eos] + body[:drop] + body[drop + 1:])
        t0 = time.perf_counter()
        ids, ents = self.m.generate(prompts, self.s.gen_tokens, limit=self.seq)
        elapsed = time.perf_counter() - t0
        ids_p, _ = self.m.generate(perturbed, self.s.gen_tokens, limit=self.seq)
        if self.m.reports_stats:
            for r, i in enumerate(mine):
                self.record("gen", (i, ids[r].tolist(), ents[r].tolist(), ids_p[r].tolist(),
                                    self.tok.decode(ids[r].tolist())))
            self.record("gen_ms", (elapsed * 1000.0, len(mine) * self.s.gen_tokens))

    # ---------------------------------------------------------------- attention
    def attention(self) -> None:
        from model.rope import apply_rotary

        s, stream = self.seq, self.held.stream
        n = min(self.s.ahd_rows, len(stream) // (s + 1))
        rows_all = stream[: n * (s + 1)].reshape(n, s + 1)
        q = min(self.s.ahd_queries, s)
        g = torch.Generator().manual_seed(self.s.seed)
        qpos = torch.randperm(s, generator=g)[:q].sort().values
        heads = self.m.cfg.model.num_heads
        tp_group = self.m.tp_group
        for chunk in _batches(self.mine(n), self.s.batch_size):
            maps: dict[int, Any] = {}
            handles = []
            for idx, block in self.m.module.layers.items():
                def hook(mod, inputs, output, layer=int(idx) + 1):
                    probs = attention_maps(mod, *inputs, qpos, apply_rotary)  # [b, h_local, Q, s]
                    mean = attn_m.head_sum(probs)
                    if self.m.layout.tp > 1:
                        dist.all_reduce(mean, group=tp_group)
                    mean = mean / heads
                    disp = attn_m.dispersion_sum(probs, mean)
                    if self.m.layout.tp > 1:
                        dist.all_reduce(disp, group=tp_group)
                    maps[layer] = (mean.float(), float(disp), probs.shape[0] * heads * probs.shape[2])
                handles.append(block.attention.register_forward_hook(hook))
            try:
                self.m.forward(rows_all[chunk])
            finally:
                for h in handles:
                    h.remove()
            if self.m.reports_hidden:
                for layer, (mean, disp, count) in maps.items():
                    for r, i in enumerate(chunk):
                        self.record("attn", (i, layer, mean[r], disp / len(chunk), count // len(chunk)))

    # ---------------------------------------------------------------- gains
    def persistence(self) -> None:
        eos = self.tok.eos_id
        for mult in [float(x) for x in self.s.persistence_multiples.split(",") if x.strip()]:
            n = int(mult * self.seq) // 2 * 2
            docs = [d for d in self.held.docs if len(d) >= n]
            if not docs:
                self.notes.append(f"persistence: no document has {n} tokens")
                continue
            for chunk in _batches(self.mine(len(docs)), self.s.batch_size):
                full = np.stack([np.concatenate([[eos], docs[i][:n]]) for i in chunk])
                half = np.stack([np.concatenate([[eos], docs[i][n // 2:n]]) for i in chunk])
                a, _ = self.m.forward(full)
                b, _ = self.m.forward(half)
                if a is not None:
                    for r, i in enumerate(chunk):
                        self.record("persist", (mult, i, b["nll"][r].numpy(), a["nll"][r, n // 2:].numpy()))

    def multiturn(self) -> None:
        eos, T = self.tok.eos_id, self.s.turn_tokens
        newline = next((i for i in range(self.tok.vocab_size) if self.tok.id_to_piece(i) == "<0x0A>"), None)
        if newline is None:
            self.notes.append("multiturn: the tokenizer has no newline byte piece")
            return
        # turns: paragraphs (split at blank lines) of at least T tokens, cut to T; dialogues are
        # runs of consecutive turns inside one document of the stream
        # turns: consecutive paragraphs (split at blank lines) accumulated until they hold T-2 tokens,
        # cut there and closed by a blank line, so every turn has exactly T tokens; a dialogue is a run
        # of consecutive turns inside one document
        runs: list[list[np.ndarray]] = []
        for doc in _split_docs(self.held.stream, eos, complete_tail=True):
            nl = doc == newline
            breaks = np.flatnonzero(nl[:-1] & nl[1:])
            turns, buffer, prev = [], [], 0
            for bpos in list(breaks) + [len(doc)]:
                para = doc[prev:bpos]
                prev = bpos + 2
                while len(para) and para[0] == newline:
                    para = para[1:]
                while len(para) and para[-1] == newline:
                    para = para[:-1]
                if not len(para):
                    continue
                buffer = list(buffer) + ([newline, newline] if buffer else []) + para.tolist()
                if len(buffer) >= T - 2:
                    turns.append(np.asarray(buffer[:T - 2] + [newline, newline], dtype=np.int64))
                    buffer = []
            if turns:
                runs.append(turns)
        for k in [int(x) for x in self.s.multiturn_ks.split(",") if x.strip()]:
            dialogues = []
            for run in runs:
                for start in range(0, len(run) - k + 1, k):
                    dialogues.append(run[start:start + k])
            dialogues = dialogues[: self.s.multiturn_dialogues]
            if not dialogues:
                self.notes.append(f"multiturn: no {k}-turn dialogue of {T}-token turns in the held-out text")
                continue
            for chunk in _batches(self.mine(len(dialogues)), self.s.batch_size):
                full = np.stack([np.concatenate([[eos]] + dialogues[i]) for i in chunk])
                last = np.stack([np.concatenate([[eos], dialogues[i][-2], dialogues[i][-1]]) for i in chunk])
                a, _ = self.m.forward(full)
                b, _ = self.m.forward(last)
                if a is not None:
                    for r, i in enumerate(chunk):
                        self.record("turns", (k, i, b["nll"][r, -T:].numpy(), a["nll"][r, -T:].numpy()))

    # ---------------------------------------------------------------- probes
    def kv_recall(self) -> None:
        eos = self.tok.eos_id
        for n in _lengths(self.s.kv_lengths, self.seq):
            try:
                probes = rec_m.make_kv_probes(self.held.filler, self.held.words, self.encode, n, self.s.kv_samples,
                                              self.s.kv_facts, self.s.seed)
            except ValueError as exc:
                self.notes.append(f"kv_recall N={n}: {exc}")
                continue
            for chunk in _batches(self.mine(len(probes)), self.s.batch_size):
                ps = [probes[i] for i in chunk]
                width = max(len(p.answer) for p in ps)
                rows = [[eos] + p.context + p.answer + [eos] * (width - len(p.answer)) for p in ps]
                t0 = time.perf_counter()
                stats, _ = self.m.forward(np.asarray(rows))
                ms = (time.perf_counter() - t0) * 1000.0
                gen, _ = self.m.generate([[eos] + p.context for p in ps], width, limit=None)
                if stats is not None:
                    c = len(ps[0].context)
                    for r, (i, p) in enumerate(zip(chunk, ps)):
                        pred = stats["argmax"][r, c:c + len(p.answer)].tolist()
                        self.record("kv", (n, i, rec_m.exact_match(gen[r].tolist(), p.answer),
                                           rec_m.teacher_forced_accuracy(pred, p.answer)))
                    self.record("kv_ms", (n, ms, len(rows) * (len(rows[0]) - 1)))

    def numerical(self) -> None:
        eos = self.tok.eos_id
        for n in _lengths(self.s.num_lengths, self.seq):
            try:
                probes = rec_m.make_numeric_probes(self.held.filler, self.encode, n, self.s.num_samples, self.s.seed)
            except ValueError as exc:
                self.notes.append(f"numerical N={n}: {exc}")
                continue
            for chunk in _batches(self.mine(len(probes)), self.s.batch_size):
                ps = [probes[i] for i in chunk]
                ga, _ = self.m.generate([[eos] + p.context_a for p in ps], 5, limit=None)
                gb, _ = self.m.generate([[eos] + p.context_b for p in ps], 5, limit=None)
                if self.m.reports_stats:
                    for r, (i, p) in enumerate(zip(chunk, ps)):
                        self.record("num", (n, i, rec_m.parse_answer(self.tok.decode(ga[r].tolist())),
                                            rec_m.parse_answer(self.tok.decode(gb[r].tolist())), p.answer))

    # ---------------------------------------------------------------- robustness and geometry
    def robustness(self) -> None:
        from model.parallel.pipeline import forward_backward_1f1b

        table = self.m.full_embedding_table()
        nn_ids = torch.zeros(self.m.cfg.model.vocab_size, dtype=torch.long)
        if dist.get_rank() == 0:
            nn_ids = rob_m.nearest_neighbours(table)
        dist.broadcast(nn_ids, src=0)
        s, stream = self.seq, self.held.stream
        n = min(self.s.robust_rows, len(stream) // (s + 1))
        rows_all = stream[: n * (s + 1)].reshape(n, s + 1)
        half = s // 2
        module = self.m.module
        for chunk in _batches(self.mine(n), self.s.batch_size):
            clean = rows_all[chunk]
            pert = clean.copy()
            for r, i in enumerate(chunk):
                ctx, _ = rob_m.substitute_tokens(clean[r, : half + 1].tolist(), nn_ids, self.s.robust_fraction,
                                                 seed=self.s.seed * 100003 + i, protect=[0])
                pert[r, : half + 1] = ctx
            a, _ = self.m.forward(clean)
            b, _ = self.m.forward(pert)
            # one-step L2 fast-gradient perturbation of the input embeddings
            grads: dict[str, torch.Tensor] = {}

            def keep_grad(out):
                out.retain_grad()
                grads["e"] = out
                return out

            for p in module.parameters():
                p.requires_grad_(True)
            handle = module.embedding.register_forward_hook(lambda m_, i_, o: keep_grad(o)) if module.is_first else None
            tokens = torch.as_tensor(clean, dtype=torch.long, device=self.m.device)
            try:
                forward_backward_1f1b(lambda mb, rec: module(mb, rec, update_ema=False), [tokens], self.m.pp_group,
                                      module.carry_specs(tokens.shape[0], s, self.m.dtype), self.m.device)
            finally:
                if handle is not None:
                    handle.remove()
                for p in module.parameters():
                    p.requires_grad_(False)
                    p.grad = None
            delta = None
            if module.is_first:
                e, g = grads["e"].detach(), grads["e"].grad
                adv = rob_m.fgsm_l2(e, g if g is not None else torch.zeros_like(e), self.s.fgsm_eps)
                delta = lambda out, adv=adv: adv  # noqa: E731
            with torch.no_grad():
                c, _ = self.m.forward(clean, embed_delta=delta)
            if a is not None:
                for r, i in enumerate(chunk):
                    self.record("robust", (i, a["nll"][r, half:].numpy(), b["nll"][r, half:].numpy(),
                                           a["argmax"][r, half:].numpy(), b["argmax"][r, half:].numpy(),
                                           (a["rank"][r] == 0).numpy(), (c["rank"][r] == 0).numpy()))

    def geometry(self) -> None:
        table = self.m.full_embedding_table()
        if dist.get_rank() != 0 or table is None:
            return
        from techniques.hcma import HCMA

        cfg = self.m.cfg
        hcfg = cfg.techniques.hcma
        hcma = HCMA(hcfg, cfg.model.hidden_size)
        try:
            hcma.refresh(table, 0, table.shape[0])
            fine = hcma._state["assign_fine"]
            coarse = hcma._state["assign_coarse"]
            self.record("geo", ("silhouette_fine", geo_m.silhouette_cosine(table, fine)))
            self.record("geo", ("silhouette_coarse", geo_m.silhouette_cosine(table, coarse)))
        except ValueError as exc:
            self.notes.append(f"geometry: no clustering ({exc})")
        before = self._reference_table()
        if before is not None:
            self.record("geo", ("knn10_overlap", geo_m.knn_overlap(before, table, self.s.knn_k)))
        self.record("geo", ("low_density_fraction", geo_m.low_density_fraction(
            table, hcfg.knn, hcfg.pi_max, projection=hcma.projection)))

    def _reference_table(self) -> Optional[torch.Tensor]:
        cfg = self.m.cfg
        V = cfg.model.vocab_size
        if self.s.reference:
            folder = resolve_checkpoint_dir(self.s.reference)
            ref_meta = json.loads((folder / "meta.json").read_text())
            tp = int(ref_meta.get("layout", {}).get("tp", 1))
            parts = []
            for tp_rank in range(tp):
                sd = torch.load(folder / "ds" / "state" / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu",
                                weights_only=False)["module"]
                parts.append(sd["embedding.weight"].float())
            return torch.cat(parts)[:V]
        from model.init import initial_value

        shape = (cfg.model.padded_vocab_size(self.m.layout.tp), cfg.model.hidden_size)
        return initial_value("embedding.weight", shape, cfg.model, cfg.train.seed)[:V]

    # ---------------------------------------------------------------- orchestration
    def run(self) -> None:
        fam = set(self.families)
        steps = [("loss", self.heldout_loss)]
        if fam & _DOC_PASS:
            steps.append(("document pass", lambda: self.document_pass(capture=bool(fam & _HIDDEN))))
        for name, fn in (("generation", self.generation), ("ahd", self.attention), ("persistence", self.persistence),
                         ("kv_recall", self.kv_recall), ("numerical", self.numerical),
                         ("multiturn", self.multiturn), ("robustness", self.robustness),
                         ("geometry", self.geometry)):
            if name in fam:
                steps.append((name, fn))
        for name, fn in steps:
            t0 = time.perf_counter()
            with torch.no_grad() if name != "robustness" else _null():
                fn()
            log0(f"eval: {name} ({time.perf_counter() - t0:.1f} s)")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def attention_maps(mod, x, cos, sin, query_positions, apply_rotary):
    """Attention probabilities `[b, h_local, Q, s]` of this rank's heads for the selected queries,
    recomputed eagerly from the attention module's inputs exactly as `model.attention.Attention`
    computes them (fused per-group QKV, RoPE, grouped-query heads, causal softmax)."""
    s, b, _ = x.shape
    qkv, _ = mod.qkv(x)
    qkv = qkv.view(s, b, mod.kv_groups, mod.q_per_group + 2, mod.head_dim)
    qk, _v = qkv.split([mod.q_per_group + 1, 1], dim=3)
    qk = apply_rotary(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
    q, k = qk.split([mod.q_per_group, 1], dim=3)
    q = q.reshape(s, b, -1, mod.head_dim)
    k = k.squeeze(3).repeat_interleave(mod.q_per_group, dim=2)
    q, k = (t.permute(1, 2, 0, 3) for t in (q, k))
    return attn_m.attention_probabilities(q, k, query_positions.to(x.device))


# ----------------------------------------------------------------------------- aggregation
def _nanmean(values) -> float:
    return lex_m.nanmean(list(values))


def aggregate(records: list[dict], ev: "Evaluator", run_logs: dict) -> dict[str, float]:
    """Rank 0: the metrics from every rank's records."""
    merged: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            merged.setdefault(k, []).extend(v)
    fam = set(ev.families)
    s, counts, L = ev.s, ev.counts, ev.L
    out: dict[str, float] = {}

    if merged.get("loss"):
        tot = np.sum(np.asarray(merged["loss"]), axis=0)
        nll = ppl_m.mean_nll(tot[0], int(tot[1]))
        out["loss/heldout_nll"] = nll
        out["loss/perplexity"] = ppl_m.perplexity(nll)
        out["loss/tokens"] = float(tot[1])

    docs = dict(sorted(merged.get("doc", []), key=lambda x: x[0]))
    if docs:
        nlls = [torch.as_tensor(d["nll"]) for d in docs.values()]
        if "ppl_f" in fam:
            w = min(s.ppl_window, max(2, min(len(x) for x in nlls) // 2))
            st = max(1, min(s.ppl_stride, w // 2))
            r = ppl_m.ppl_fluctuation(nlls, w, st)
            out.update({"ppl_f/ppl_f": r["ppl_f"], "ppl_f/ppl_cv": r["ppl_cv"], "ppl_f/documents": r["documents"],
                        "ppl_f/window": w})
        if "entropy" in fam:
            r = ent_m.sequence_entropy_stats([torch.as_tensor(d["entropy"]) for d in docs.values()])
            out.update({"entropy/hbar_mean": r["mean"], "entropy/hbar_var": r["var"], "entropy/sequences": r["sequences"]})
        target = np.concatenate([d["target"] for d in docs.values()])
        ranks = np.concatenate([d["rank"] for d in docs.values()])
        ranks_cos = np.concatenate([d["rank_cos"] for d in docs.values()])
        gap = np.concatenate([d["gap"] for d in docs.values()])
        if counts is not None:
            freq = rec_m.frequency_of(target, counts)
            if "rare_recall" in fam:
                res = rec_m.accuracy_by_bucket(ranks, freq, (1, 5), mask=gap)
                out["rare_recall/gap"] = ev.rare_gap
                for bucket, row in res.items():
                    for k, v in row.items():
                        out[f"rare_recall/{bucket}/{k}"] = v
            if "retrieval" in fam:
                for name, rk, mask in (("logit", ranks, None), ("cosine", ranks_cos, None), ("gap", ranks, gap)):
                    res = geo_m.retrieval_at_k(rk, freq, (1, 10), mask=mask)
                    for bucket, row in res.items():
                        for k, v in row.items():
                            out[f"retrieval/{name}/{bucket}/{k}"] = v
            if "rare_words" in fam:
                nll_all = np.concatenate([d["nll"] for d in docs.values()])
                r = ppl_m.restricted_nll(torch.as_tensor(nll_all), torch.as_tensor(freq), s.rare_max_frequency)
                out["rare_words/nll_rare"] = r["nll"]
                out["rare_words/rare_targets"] = r["tokens"]
        else:
            ev.notes.append("no training-token counts: frequency-bucket metrics skipped")
        if "overhead" in fam and merged.get("tf_ms_per_token"):
            ms = np.sum(np.asarray(merged["tf_ms_per_token"]), axis=0)
            out["overhead/inference_ms_per_token"] = ms[0] / max(ms[1], 1)

    hidden: dict[tuple, dict] = {(d, p): v for d, p, v in merged.get("hidden", [])}
    if hidden:
        points = sorted({p for _, p in hidden})
        if "repvar" in fam:
            for p in points:
                out[f"repvar/layer{p}"] = _nanmean(v["repvar"] for (d, q), v in hidden.items() if q == p)
            out["repvar/mean"] = _nanmean(out[f"repvar/layer{p}"] for p in points if p > 0)
        if "drift" in fam:
            out["drift/latent_drift"] = _nanmean(v["drift"] for (d, q), v in hidden.items() if q == L)
        pooled = {p: torch.cat([v["sample"] for (d, q), v in sorted(hidden.items()) if q == p]) for p in points}
        aniso = {p: rep_m.anisotropy(pooled[p], s.anisotropy_pairs, s.seed) for p in points}
        if "collapse" in fam:
            for p in points:
                out[f"collapse/erank_layer{p}"] = rep_m.effective_rank(pooled[p][: s.erank_tokens])
                out[f"collapse/anisotropy_layer{p}"] = aniso[p]
            out["collapse/erank_last"] = out[f"collapse/erank_layer{L}"]
            out["collapse/anisotropy_last"] = aniso[L]
        if "coherence" in fam:
            for p, name in ((ev.sca_layer, "sca_layer"), (L, "last")):
                keys = [(d, q) for (d, q), v in sorted(hidden.items()) if q == p and "chunks" in v]
                r = rep_m.coherence_report([hidden[k]["chunks"] for k in keys],
                                           groups=[ev.held.doc_source[d] for d, _ in keys])
                for k, v in r.items():
                    out[f"coherence/{name}/{k}"] = v
            out["coherence/sca_layer_index"] = ev.sca_layer
        if "rare_words" in fam and counts is not None:
            toks, states, docs_of = [], [], []
            for (d, q), v in sorted(hidden.items()):
                if q == L and "rare_states" in v:
                    t, h = v["rare_states"]
                    toks += t
                    states.append(h)
                    docs_of += [ev.held.doc_source[d]] * len(t)
            if states:
                r = rep_m.self_consistency(torch.cat(states), toks, docs_of, aniso[L])
                out["rare_words/same_token_cos"] = r["same_token_cos"]
                out["rare_words/self_consistency"] = r["self_consistency"]
                out["rare_words/consistency_tokens"] = r["tokens"]

    if merged.get("gen"):
        gens = sorted(merged["gen"], key=lambda g: g[0])
        out["generation/ev"] = ent_m.entropy_variance([torch.tensor(g[2]) for g in gens])
        out["generation/li"] = _nanmean(lex_m.lexical_instability(g[1], g[3]) for g in gens)
        out["generation/rep4"] = _nanmean(lex_m.rep_n(g[1], 4) for g in gens)
        out["generation/distinct2"] = _nanmean(lex_m.distinct_n(g[1], 2) for g in gens)
        out["generation/sentence_len_std"] = _nanmean(lex_m.sentence_length_std(g[4]) for g in gens)
        out["generation/mean_entropy"] = float(np.mean([np.mean(g[2]) for g in gens]))
        ms = np.sum(np.asarray(merged["gen_ms"]), axis=0)
        out["generation/ms_per_token"] = ms[0] / max(ms[1], 1)
        out["generation/prompts"] = len(gens)

    if merged.get("attn"):
        by_layer: dict[int, dict[int, torch.Tensor]] = {}
        disp: dict[int, list] = {}
        for i, layer, mean, dsum, count in merged["attn"]:
            by_layer.setdefault(layer, {})[i] = mean
            disp.setdefault(layer, []).append((dsum, count))
        layers = sorted(by_layer)
        rows = sorted(by_layer[layers[0]])
        maps = [torch.stack([by_layer[l][i] for i in rows]) for l in layers]
        ahd = attn_m.cross_layer_ahd(maps)
        for l, v in zip(layers[:-1], ahd):
            out[f"ahd/layer{l}"] = v
        out["ahd/mean"] = float(np.mean(ahd)) if ahd else float("nan")
        for l in layers:
            tot = np.sum(np.asarray(disp[l]), axis=0)
            out[f"ahd/dispersion_layer{l}"] = tot[0] / max(tot[1], 1)
        out["ahd/dispersion_mean"] = float(np.mean([out[f"ahd/dispersion_layer{l}"] for l in layers]))

    if merged.get("persist"):
        for mult in sorted({p[0] for p in merged["persist"]}):
            sel = [p for p in merged["persist"] if p[0] == mult]
            out[f"persistence/gain_{mult:g}x"] = ppl_m.nll_gain(np.concatenate([p[2] for p in sel]),
                                                               np.concatenate([p[3] for p in sel]))
            out[f"persistence/segments_{mult:g}x"] = len(sel)

    if merged.get("turns"):
        for k in sorted({t[0] for t in merged["turns"]}):
            sel = [t for t in merged["turns"] if t[0] == k]
            out[f"multiturn/k{k}/gain"] = ppl_m.nll_gain(np.concatenate([t[2] for t in sel]),
                                                         np.concatenate([t[3] for t in sel]))
            out[f"multiturn/k{k}/dialogues"] = len(sel)

    if merged.get("kv"):
        for n in sorted({k[0] for k in merged["kv"]}):
            sel = [k for k in merged["kv"] if k[0] == n]
            out[f"kv_recall/N{n}/exact_match"] = float(np.mean([k[2] for k in sel]))
            out[f"kv_recall/N{n}/teacher_forced"] = float(np.mean([k[3] for k in sel]))
            out[f"kv_recall/N{n}/samples"] = len(sel)
            ms = np.sum(np.asarray([(m[1], m[2]) for m in merged.get("kv_ms", []) if m[0] == n]), axis=0)
            out[f"kv_recall/N{n}/ms_per_token"] = ms[0] / max(ms[1], 1)
        out["kv_recall/exact_match_mean"] = _nanmean(v for k, v in out.items() if k.endswith("/exact_match"))
        out["kv_recall/teacher_forced_mean"] = _nanmean(v for k, v in out.items()
                                                        if k.startswith("kv_recall/N") and k.endswith("/teacher_forced"))

    if merged.get("num"):
        for n in sorted({x[0] for x in merged["num"]}):
            sel = sorted([x for x in merged["num"] if x[0] == n], key=lambda x: x[1])
            r = rec_m.numeric_scores([x[2] for x in sel], [x[3] for x in sel], [x[4] for x in sel])
            out[f"numerical/N{n}/accuracy"] = r["accuracy"]
            out[f"numerical/N{n}/consistency"] = r["consistency"]
            out[f"numerical/N{n}/samples"] = r["samples"]

    if merged.get("robust"):
        rb = sorted(merged["robust"], key=lambda x: x[0])
        out["robustness/token_delta_nll"] = rob_m.delta_nll(np.concatenate([x[1] for x in rb]),
                                                            np.concatenate([x[2] for x in rb]))
        out["robustness/token_top1_agreement"] = rob_m.top1_agreement(np.concatenate([x[3] for x in rb]),
                                                                      np.concatenate([x[4] for x in rb]))
        r = rob_m.accuracy_drop(np.concatenate([x[5] for x in rb]), np.concatenate([x[6] for x in rb]))
        out["robustness/fgsm_acc_clean"] = r["acc_clean"]
        out["robustness/fgsm_acc_adversarial"] = r["acc_adversarial"]
        out["robustness/fgsm_drop"] = r["drop"]

    for name, value in merged.get("geo", []):
        out[f"geometry/{name}"] = value

    if "smoothness" in fam and run_logs.get("train/grad_norm"):
        g = [v for _, v in sorted(run_logs["train/grad_norm"].items())]
        out["smoothness/grad_norm_cv"] = opt_m.grad_norm_cv(g, s.smooth_window)
        out["smoothness/grad_norm_spikes"] = float(opt_m.grad_norm_spikes(g, 3.0, s.smooth_window))
        out["smoothness/logged_steps"] = float(len(g))
    elif "smoothness" in fam:
        ev.notes.append("smoothness: the run's TensorBoard has no train/grad_norm")
    if "overhead" in fam:
        for tag, key in (("throughput/tokens_per_s", "train_tokens_per_s"), ("time/step_s", "train_step_s"),
                         ("memory/peak_allocated_gb", "train_peak_memory_gb"), ("memory/rss_gb", "train_rss_gb")):
            if run_logs.get(tag):
                vals = [v for _, v in sorted(run_logs[tag].items())]
                tail = vals[len(vals) // 2:] or vals  # the second half: past start-up effects
                out[f"overhead/{key}"] = float(max(tail) if "memory" in tag else np.median(tail))
    return out


def read_run_logs(run_dir: Path) -> dict[str, dict[int, float]]:
    folder = run_dir / "tensorboard"
    if not folder.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
            if not tag.startswith("evaluate/")}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


# ----------------------------------------------------------------------------------- entry
def evaluate(checkpoint: str, data: Optional[str], families: list[str], settings: EvalSettings,
             out: Optional[str], tb: Optional[str], train_data: Optional[str] = None) -> Optional[dict]:
    """Collective over the world. Returns the result dict on rank 0 (None elsewhere)."""
    from data.tokenizer import Tokenizer
    from launch.metrics import MetricsWriter
    from launch.prepare_data import prepare_data

    start = time.perf_counter()
    folder = resolve_checkpoint_dir(checkpoint)
    model = EvalModel(folder)
    cfg = model.cfg
    log0(f"eval: {folder} (step {model.step}) · layout DP {model.layout.dp} × PP {model.layout.pp} × "
         f"TP {model.layout.tp} · {len(families)} metric families")
    tok_path = folder / "tokenizer.model"
    prepared = None
    if train_data is None or data is None or not tok_path.is_file():
        try:
            prepared = prepare_data(cfg.data, cfg.model.seq_length, cfg.model.vocab_size, log=log0)
        except ValueError as exc:
            log0(f"warning: the run's data could not be prepared ({exc})")
    tokenizer = Tokenizer(tok_path if tok_path.is_file() else prepared.tokenizer)
    source = data or (prepared.eval if prepared else None)
    if not source:
        raise ValueError("no held-out data: pass --data (a shard manifest, a built-in corpus or text files)")
    box: list = [None, None]
    if dist.get_rank() == 0:
        stream, label = read_heldout(source, tokenizer, settings, cfg.data.cache_dir, log=log0)
        from_manifest = label.startswith("manifest")
        box[0] = select_heldout(stream, tokenizer, label, settings, cfg.model.seq_length, from_manifest)
        needs_counts = set(families) & {"rare_recall", "retrieval", "rare_words"}
        box[1] = training_token_counts(train_data or (prepared.train if prepared else None), cfg.model.vocab_size,
                                       log=log0) if needs_counts else None
    dist.broadcast_object_list(box, src=0)
    held, counts = box
    log0(f"eval: held-out data from {held.source}: {len(held.stream):,} tokens, {len(held.docs)} documents "
         f"for the document pass")
    ev = Evaluator(model, tokenizer, held, counts, settings, families)
    ev.run()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(ev.records, gathered, dst=0)
    notes_all = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(ev.notes, notes_all, dst=0)
    if dist.get_rank() != 0:
        return None
    run_dir = folder.parent.parent
    logs = read_run_logs(run_dir) if set(families) & {"smoothness", "overhead"} else {}
    metrics = aggregate(gathered, ev, logs)
    notes = sorted({n for ns in notes_all for n in ns})
    result = {
        "checkpoint": str(folder.resolve()), "step": model.step, "data": held.source, "families": families,
        "layout": {"dp": model.layout.dp, "pp": model.layout.pp, "tp": model.layout.tp},
        "settings": asdict(settings), "rare_gap": ev.rare_gap, "notes": notes,
        "metrics": {k: _json_safe(float(v)) for k, v in sorted(metrics.items())},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    out_path = Path(out) if out else run_dir / "eval" / f"eval_step_{model.step:08d}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out_path)
    tb_dir = tb or str(run_dir / "tensorboard")
    writer = MetricsWriter(tb_dir, enabled=True)
    writer.scalars({f"evaluate/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(float(v))},
                   model.step)
    writer.close()
    result["out"], result["tb"] = str(out_path), tb_dir
    return result


def eval_from_cli(args) -> int:
    from launch.env import init_distributed, read_dist_env

    if args.list:
        for name, text in FAMILIES.items():
            print(f"{name:12s} {text}")
        return 0
    if not args.checkpoint:
        raise ValueError("give a checkpoint folder (or run directory)")
    families = parse_families(args.metrics)
    settings = parse_settings(args.set or [])
    resolve_checkpoint_dir(args.checkpoint)  # fail before any process group
    denv = read_dist_env()
    init_distributed(denv, 1800.0)
    try:
        result = evaluate(args.checkpoint, args.data, families, settings, args.out, args.tb, args.train_data)
        if result is not None:
            _print_summary(result)
        return 0
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _print_summary(result: dict) -> None:
    m = result["metrics"]
    print(f"eval: {len(m)} scalars in {result['wall_s']} s → {result['out']} (TensorBoard: {result['tb']})")
    for key in ("loss/heldout_nll", "loss/perplexity", "ppl_f/ppl_f", "entropy/hbar_mean", "generation/ev",
                "generation/li", "drift/latent_drift", "ahd/mean", "kv_recall/exact_match_mean",
                "coherence/last/coh", "collapse/erank_last", "robustness/fgsm_drop", "geometry/silhouette_fine"):
        if key in m:
            value = m[key]
            print(f"  {key:32s} {value if value is None else f'{value:.4f}'}")
    for note in result["notes"]:
        print(f"  note: {note}")
    sys.stdout.flush()
