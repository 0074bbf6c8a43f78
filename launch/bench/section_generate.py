"""`loom bench` section `generate`: greedy decoding of 1,024 new tokens with the KV cache (and the
techniques' inference state) against recomputing the whole sequence every step, for the baseline and all
five techniques, at the benchmark shape's width and depth (`launch.generate.decode` for both)."""

from __future__ import annotations

import dataclasses
import logging

from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_time, target_verdict
from loom.launch.bench.section_techniques import technique_configs
from loom.launch.bench.shapes import Shape, model_config
from loom.launch.bench.workers import worker_groups
from loom.launch.bench.workloads import init_grid

log = logging.getLogger(__name__)

NEW_TOKENS = 1024
PROMPT_TOKENS = 32
CACHED_REPEATS = 3
"""The cached run is short: its best of three is reported (the uncached one runs once)."""
TARGET_SPEEDUP = 5.0


class Decoding:
    """One configuration's stage in a worker: greedy decoding of one prompt, with or without the cache."""

    def __init__(self, rank, world, shape: Shape, tech):
        import torch

        from loom.model.parallel.parallelize import build_stage

        cfg = dataclasses.replace(model_config(shape), seq_length=PROMPT_TOKENS + NEW_TOKENS)
        self.stage = build_stage(cfg, tech, init_grid(1, 1), seed=0).eval()
        g = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(4, shape.vocab, (PROMPT_TOKENS,), generator=g).tolist()

    def run(self, use_cache: bool, new_tokens: int = NEW_TOKENS) -> dict:
        from loom.launch.generate.decode import StageRunner, decode

        vocab = self.stage.cfg.vocab_size
        runner = StageRunner(self.stage, lambda last: last[:, :vocab].argmax(-1).double()[:, None])
        out = decode(runner, [self.prompt], new_tokens, use_cache=use_cache)
        return {"seconds": out.seconds, "tokens": out.new_tokens, "ids": out.ids[0]}


def section_generate(opts: BenchOptions, report: Report) -> None:
    shape, t = opts.shape, opts.threads
    configs = {name: tech for name, tech in technique_configs(shape).items() if name in ("baseline", "all five")}
    specs = {name: (Decoding, 1, t, {"shape": shape, "tech": tech}) for name, tech in configs.items()}
    log.info(f"generate: {len(configs)} configurations, {NEW_TOKENS} new tokens, 1 process × {t} threads")
    runs: dict = {}
    with worker_groups(specs) as groups:
        for name, group in groups.items():
            group.call("run", use_cache=True, new_tokens=8)  # warm-up: allocator, kernels, RoPE table
            cached = [group.call("run", use_cache=True)[0] for _ in range(CACHED_REPEATS)]
            log.info(f"generate: {name} cached {min(r['seconds'] for r in cached):.1f}s; recomputing every step …")
            runs[name] = {
                "cached": min(cached, key=lambda r: r["seconds"]),
                "uncached": group.call("run", use_cache=False)[0],
            }
    rows, results = [], {}
    for name, r in runs.items():
        cached, uncached = r["cached"], r["uncached"]
        rate_cached, rate_uncached = cached["tokens"] / cached["seconds"], uncached["tokens"] / uncached["seconds"]
        speedup = rate_cached / rate_uncached
        results[name] = {"cached_tokens_per_s": rate_cached, "uncached_tokens_per_s": rate_uncached, "speedup": speedup}
        rows.append(
            [
                name,
                f"{rate_cached:,.1f} ({fmt_time(cached['seconds'])})",
                f"{rate_uncached:,.1f} ({fmt_time(uncached['seconds'])})",
                f"{speedup:.1f}×",
                target_verdict(speedup, TARGET_SPEEDUP, lower_is_better=False),
                "yes" if cached["ids"] == uncached["ids"] else "no",
            ]
        )
    report.add(
        f"### Generation: KV cache vs recomputing the sequence ({NEW_TOKENS} new tokens, 1 process × {t} threads)",
        "",
        f"Greedy decoding of one {PROMPT_TOKENS}-token prompt at the {shape.name} shape's width and depth "
        f"({shape.layers} layers, d={shape.hidden}, vocab {shape.vocab}; context {PROMPT_TOKENS + NEW_TOKENS}). "
        "Cached: the prompt once, then one token per step with the keys and values, LCM's window and SCR's "
        f"sums (best of {CACHED_REPEATS}); uncached: the whole sequence every step (once). Target: cached "
        f"≥ {TARGET_SPEEDUP:g}× the uncached tokens/s.",
        "",
    )
    report.table(["config", "cached tokens/s", "uncached tokens/s", "speed-up", "target", "same greedy tokens"], rows)
    report.add("")
    report.results["generate"] = results
