"""`loom bench` section `techniques`: each technique's step-time and memory overhead, and all five."""

from __future__ import annotations

import logging

from loom.launch.bench.alternate import alternate, paired_ratio
from loom.launch.bench.hardware import Hardware
from loom.launch.bench.loom_workload import LoomTrainer
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_bytes, fmt_time, target_verdict
from loom.launch.bench.shapes import Shape
from loom.launch.bench.workers import worker_groups

log = logging.getLogger(__name__)


def technique_configs(shape: Shape) -> dict:
    """Each technique alone with the spec's defaults, and all five together. SCA's L_field warm-up
    is set to 0 so its full cost is measured; HCMA's refresh runs at step 0 (before timing)."""
    from loom.techniques.config import TechniquesConfig

    def make(*names):
        tech = TechniquesConfig()
        for name in names:
            getattr(tech, name).enabled = True
        tech.sca.warmup_steps = 0
        if shape.name == "quick":  # sized for the tiny shape so every path runs
            tech.lcm.K, tech.scr.rank, tech.cmr.rank, tech.sca.rank, tech.sca.window = 4, 8, 8, 8, 16
            tech.hcma.K1, tech.hcma.K2, tech.hcma.proj_dim, tech.hcma.knn = 4, 16, 16, 4
        return tech

    configs = {"baseline": make(), "baseline (A/A control)": make()}
    for name in ("lcm", "scr", "cmr", "sca", "hcma"):
        configs[name] = make(name)
    configs["all five"] = make("lcm", "scr", "cmr", "sca", "hcma")
    return configs


def section_techniques(opts: BenchOptions, report: Report) -> None:
    shape, t = opts.shape, opts.threads
    configs = technique_configs(shape)
    specs = {name: (LoomTrainer, 1, t, {"shape": shape, "tech": tech}) for name, tech in configs.items()}
    log.info(f"techniques: {len(configs)} configurations, 1 process × {t} threads")
    with worker_groups(specs) as groups:
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, None, Hardware(), opts.quiet_wait)
        memory = {name: g.call("memory_report")[0] for name, g in groups.items()}
        refresh = {name: g.call("hcma_refresh_seconds")[0] for name, g in groups.items() if configs[name].hcma.enabled}
    base = series["baseline"]
    report.results["series_techniques"] = series

    def tensor_total(m):
        return m["params"] + m["grads"] + m["optimizer"] + m["buffers"] + m["technique_state"] + m["activations"]

    rows, ratios = [], {}
    for name, s in series.items():
        m = memory[name]
        time_ratio = paired_ratio(s, base)
        mem_ratio = tensor_total(m) / tensor_total(memory["baseline"])
        act_ratio = m["activations"] / memory["baseline"]["activations"]
        rss_growth = (m["rss_high_water_kb"] - memory["baseline"]["rss_high_water_kb"]) / 1024
        target = 1.10 if name == "all five" else 1.03
        ratios[name] = {"time": time_ratio, "memory": mem_ratio, "best": s.best / base.best}
        rows.append(
            [
                name,
                fmt_time(s.median),
                f"{time_ratio:.3f}",
                f"{s.best / base.best:.3f}",
                "–" if name.startswith("baseline") else target_verdict(time_ratio, target),
                fmt_bytes(tensor_total(m)),
                f"{mem_ratio:.3f}",
                f"{act_ratio:.3f}",
                f"{m['rss_high_water_kb'] / 1024:.0f} MiB ({rss_growth:+.0f})",
            ]
        )
    report.add(
        f"### Technique overhead (Loom trainer path, 1 process × {t} threads, same shape)",
        "",
        "Spec defaults (`techniques/config.py`), except SCA's `warmup_steps=0` so L_field is live. "
        "Memory = tensor bytes at the step's peak: parameters + gradients (taken just before the "
        "optimizer step) + AdamW state + buffers + "
        "technique state + activations saved for backward (distinct storages, counted with "
        "`torch.autograd.graph.saved_tensors_hooks`). RSS high-water is `ru_maxrss` of the config's own "
        "worker process (± vs baseline; allocator caching makes it coarse). The A/A control is a second, "
        "identical baseline process: its ratio is the noise floor of this table.",
        "",
    )
    report.table(
        [
            "config",
            "step time",
            "time / baseline (paired median)",
            "best ÷ best",
            "target",
            "tensor bytes at peak",
            "memory / baseline",
            "activations / baseline",
            "RSS high-water",
        ],
        rows,
    )
    for name, seconds in refresh.items():
        every = configs[name].hcma.refresh_every
        report.add(
            f"HCMA refresh ({name}): {fmt_time(seconds)} every {every} steps = "
            f"{seconds / every / base.median * 100:.2f}% of a baseline step, amortised (not in the step times)."
        )
    report.add("")
    report.results["techniques"] = ratios
