"""The techniques study's report: collect every run's evaluation and training curves, summarise each
metric over seeds with a Welch and a paired (by seed) t-test against the baseline, draw the plots
and write `report.md` (see `launch/study/execute.py` for running the study)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

from loom.launch.study.config import StudyConfig, arms_of, load_status, plan_runs

KEY_METRICS: List[tuple] = [
    # (metric key, claim tested, technique, better direction)
    ("loss/heldout_nll", "held-out loss", "all", "lower"),
    ("loss/perplexity", "perplexity (SCA 15.6→12.4; HCMA)", "SCA, HCMA", "lower"),
    ("ppl_f/ppl_f", "lower perplexity fluctuation", "LCM", "lower"),
    ("generation/ev", "lower entropy variance", "LCM", "lower"),
    ("generation/li", "lower lexical instability", "LCM", "lower"),
    ("generation/rep4", "less repetition", "LCM", "lower"),
    ("generation/sentence_len_std", "balanced sentence lengths", "LCM", "context"),
    ("drift/latent_drift", "contextual alignment (proxy)", "LCM", "lower"),
    ("smoothness/grad_norm_cv", "smoother optimisation", "LCM", "lower"),
    ("smoothness/grad_norm_spikes", "fewer grad-norm spikes", "LCM", "lower"),
    ("entropy/hbar_var", "moderated sequence-entropy variability", "SCR", "lower"),
    ("entropy/hbar_mean", "no entropy collapse", "SCR", "context"),
    ("generation/distinct2", "distinct-2 does not drop", "SCR", "higher"),
    ("repvar/mean", "moderated representational variability", "SCR", "context"),
    ("ahd/mean", "smoother cross-layer attention (AHD)", "SCR", "lower"),
    ("persistence/gain_1x", "context persistence", "SCR", "higher"),
    ("kv_recall/teacher_forced_mean", "token recall against length", "CMR, HCMA", "higher"),
    ("kv_recall/exact_match_mean", "token recall (exact match)", "CMR, HCMA", "higher"),
    ("rare_recall/all/top1", "rare-token recall (long gap)", "CMR", "higher"),
    ("rare_recall/0-10/top5", "rare-token recall, freq ≤ 10 (top-5)", "CMR", "higher"),
    ("numerical/N500/accuracy", "numerical reasoning", "CMR", "higher"),
    ("numerical/N500/consistency", "numerical consistency", "CMR", "higher"),
    ("multiturn/k4/gain", "multi-turn coherence (proxy)", "CMR", "higher"),
    ("coherence/sca_layer/coh", "coherence score (0.72→0.85)", "SCA", "higher"),
    ("coherence/sca_layer/margin", "coherence margin", "SCA", "higher"),
    ("collapse/erank_last", "mitigates representation collapse", "SCA", "higher"),
    ("collapse/anisotropy_last", "less anisotropy", "SCA", "lower"),
    ("rare_words/nll_rare", "better rare-word embeddings (NLL)", "SCA", "lower"),
    ("rare_words/self_consistency", "rare-token self-consistency", "SCA", "higher"),
    ("retrieval/logit/0-10/top10", "rare-token retrieval@10 (freq ≤ 10)", "HCMA", "higher"),
    ("retrieval/cosine/0-10/top10", "rare-token retrieval@10, cosine", "HCMA", "higher"),
    ("robustness/token_delta_nll", "adversarial robustness (token ΔNLL)", "HCMA", "lower"),
    ("robustness/fgsm_drop", "adversarial robustness (FGSM drop)", "HCMA", "lower"),
    ("geometry/silhouette_fine", "cluster structure (silhouette)", "HCMA", "higher"),
    ("geometry/knn10_overlap", "structure kept vs initial table", "HCMA", "context"),
    ("geometry/low_density_fraction", "fewer fragmented tokens", "HCMA", "lower"),
    ("overhead/train_tokens_per_s", "training overhead (tokens/s)", "all", "higher"),
    ("overhead/inference_ms_per_token", "inference overhead (ms/token)", "all", "lower"),
]
PLOT_METRICS = [k for k, *_ in KEY_METRICS if not k.startswith("loss/perplexity")]


def collect(cfg: StudyConfig) -> dict:
    """{arm: {seed: {"metrics": {...}, "curves": {tag: {step: value}}, "status": {...}}}}"""
    from loom.launch.eval.evaluate import read_run_logs

    status = load_status(cfg)
    data: Dict[str, Dict[int, dict]] = {}
    for spec in plan_runs(cfg):
        item: dict = {"status": status.get(f"{spec.arm}/seed{spec.seed}", {})}
        ev = spec.folder / "eval.json"
        if ev.is_file():
            result = json.loads(ev.read_text())
            item["metrics"] = result.get("metrics", {})
            item["notes"] = result.get("notes", [])
        logs = read_run_logs(spec.folder)
        item["curves"] = {k: v for k, v in logs.items() if k in ("train/loss", "eval/loss", "train/grad_norm")}
        data.setdefault(spec.arm, {})[spec.seed] = item
    return data


def _values_by_seed(data: dict, arm: str, key: str) -> Dict[Any, float]:
    out = {}
    for seed, item in data.get(arm, {}).items():
        v = item.get("metrics", {}).get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            out[seed] = float(v)
    return out


def _values(data: dict, arm: str, key: str) -> List[float]:
    return list(_values_by_seed(data, arm, key).values())


def summarise(values: List[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof = 1; 0 for one value) and count."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def welch(a: List[float], b: List[float]) -> float:
    """Two-sided Welch t-test p-value of `a` against `b` (NaN when undefined)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    from scipy import stats

    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired(a: Dict[Any, float], b: Dict[Any, float]) -> float:
    """Two-sided paired t-test p-value over the seeds both arms have (NaN with fewer than 2).

    Every arm trains with the same seeds (weights, data order), so a seed's baseline is the matched
    control of that seed's arm; pairing removes the between-seed spread from the comparison."""
    seeds = sorted(set(a) & set(b), key=str)
    if len(seeds) < 2:
        return float("nan")
    from scipy import stats

    diffs = [a[s] - b[s] for s in seeds]
    if max(diffs) == min(diffs):  # no spread: identical runs (1) or an undefined test (a discrete metric's step)
        return 1.0 if diffs[0] == 0 else float("nan")
    return float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.2e}"
    return f"{x:.4f}" if a < 10 else f"{x:.2f}"


def _cell(data, arm, key, alpha) -> str:
    vals = _values(data, arm, key)
    mean, std, n = summarise(vals)
    if n == 0:
        return "–"
    text = f"{_fmt(mean)} ± {_fmt(std)}"
    if arm != "baseline":
        p = welch(vals, _values(data, "baseline", key))
        pp = paired(_values_by_seed(data, arm, key), _values_by_seed(data, "baseline", key))
        tests = [f"{name}={v:.2g}{'*' if v < alpha else ''}" for name, v in (("p", p), ("pp", pp)) if math.isfinite(v)]
        if tests:
            text += f" ({' · '.join(tests)})"
    return text


def write_plots(cfg: StudyConfig, data: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = [a for a in arms_of(cfg) if a in data]
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    files = []

    def save(fig, ax, name, xlabel, ylabel, title):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        files.append(name)

    # loss curves: mean over seeds with a min–max band
    for tag, name, title in (
        ("train/loss", "loss_curves.png", "training loss"),
        ("eval/loss", "eval_loss_curves.png", "held-out loss during training"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        drew = False
        for arm in arms:
            curves = [item["curves"].get(tag, {}) for item in data[arm].values() if item["curves"].get(tag)]
            if not curves:
                continue
            steps = sorted(set.intersection(*[set(c) for c in curves]))
            if not steps:
                continue
            arr = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, arr.mean(0), label=f"{arm} (n={len(curves)})", color=colors[arm], lw=1.4)
            if len(curves) > 1:
                ax.fill_between(steps, arr.min(0), arr.max(0), color=colors[arm], alpha=0.15)
            drew = True
        if drew:
            save(fig, ax, name, "step", "loss (nats/token)", f"{cfg.name}: {title} (mean over seeds, band = min–max)")
        plt.close(fig)

    # key metrics: one panel per metric, bars = mean, error bars = std, dots = seeds
    keys = [k for k in PLOT_METRICS if any(_values(data, a, k) for a in arms)]
    if keys:
        cols = 4
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for x, arm in enumerate(arms):
                vals = _values(data, arm, key)
                if not vals:
                    continue
                mean, std, _ = summarise(vals)
                ax.bar(x, mean, yerr=std, color=colors[arm], alpha=0.7, capsize=3)
                ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, rotation=45, fontsize=7)
            ax.set_title(key, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.suptitle(f"{cfg.name}: key metrics (mean ± std over seeds; dots = seeds)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(out / "key_metrics.png", dpi=100)
        plt.close(fig)
        files.append("key_metrics.png")

    # recall against length and retrieval by frequency bucket
    def series_plot(prefix_fn, xs, xlabel, name, title, ylabel):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drew = False
        for arm in arms:
            means, stds, xs_ok = [], [], []
            for x in xs:
                vals = _values(data, arm, prefix_fn(x))
                if vals:
                    m, s, _ = summarise(vals)
                    means.append(m)
                    stds.append(s)
                    xs_ok.append(x)
            if xs_ok:
                pos = [xs.index(x) for x in xs_ok]
                ax.errorbar(pos, means, yerr=stds, label=arm, color=colors[arm], marker="o", capsize=3, lw=1.2)
                drew = True
        if drew:
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(x) for x in xs])
            save(fig, ax, name, xlabel, ylabel, title)
        plt.close(fig)

    lengths = sorted(
        {
            int(k.split("/")[1][1:])
            for a in arms
            for item in data[a].values()
            for k in item.get("metrics", {})
            if k.startswith("kv_recall/N")
        }
    )
    series_plot(
        lambda n: f"kv_recall/N{n}/teacher_forced",
        lengths,
        "context length N (tokens)",
        "kv_recall.png",
        "key-value recall (teacher-forced top-1 over value tokens)",
        "accuracy",
    )
    from loom.techniques.metrics.recall import BUCKET_NAMES

    series_plot(
        lambda b: f"retrieval/logit/{b}/top10",
        list(BUCKET_NAMES),
        "training frequency",
        "retrieval.png",
        "next-token retrieval@10 by training-frequency bucket",
        "top-10 accuracy",
    )
    return files


def write_report(cfg: StudyConfig, command: str, config_text: str) -> Path:
    out = Path(cfg.output_dir)
    data = collect(cfg)
    plots = write_plots(cfg, data, out)
    arms = [a for a in arms_of(cfg) if a in data]
    lines = [f"# {cfg.name}: techniques study", ""]
    n_runs = sum(len(v) for v in data.values())
    n_eval = sum(1 for v in data.values() for item in v.values() if item.get("metrics"))
    lines += [
        f"Command: `{command}`",
        "",
        f"Arms: {', '.join(arms)} · seeds: {cfg.seeds} · runs planned: {n_runs} · evaluated: {n_eval}",
        "",
        "Every arm trains on the same data with the same seeds (each seed sets `train.seed` and `data.seed`) "
        "for the same number of steps and tokens; only the technique switches differ. Cells are "
        "mean ± sample std (ddof = 1) over seeds; `p` is the two-sided Welch t-test "
        "(`scipy.stats.ttest_ind(equal_var=False)`) against the baseline, `pp` the two-sided paired t-test "
        "over the seeds both arms share (`scipy.stats.ttest_rel`; a seed's baseline run is that seed's "
        f"matched control, so pairing removes the between-seed spread); `*` marks a p-value < {cfg.alpha}. "
        "No correction for multiple comparisons: with this many metrics some p < 0.05 are expected by chance, "
        "and with few seeds the test has little power. Metric definitions: TECHNIQUES.md §3.14–§7.14 and "
        "`techniques/metrics/`. Timing metrics (`overhead/*`, `*/ms_per_token`, wall times) are only "
        "comparable between runs made on an otherwise idle machine.",
        "",
    ]
    failures = [
        (a, s, item["status"]["error"]) for a in data for s, item in data[a].items() if item["status"].get("error")
    ]
    missing = [(a, s) for a in data for s, item in data[a].items() if not item.get("metrics")]
    if failures or missing:
        lines += ["## Incomplete runs", ""]
        lines += [f"* {a} seed {s}: {e}" for a, s, e in failures]
        lines += [
            f"* {a} seed {s}: no evaluation" for a, s in missing if (a, s) not in {(x, y) for x, y, _ in failures}
        ]
        lines.append("")
    lines += [
        "## Key metrics (one per claim)",
        "",
        "| metric | claim | technique | better | " + " | ".join(arms) + " |",
        "|---|---|---|---|" + "---|" * len(arms),
    ]
    for key, claim, tech, better in KEY_METRICS:
        if not any(_values(data, a, key) for a in arms):
            continue
        lines.append(
            f"| `{key}` | {claim} | {tech} | {better} | "
            + " | ".join(_cell(data, a, key, cfg.alpha) for a in arms)
            + " |"
        )
    lines.append("")
    lines += [
        "## Wall time per run (s)",
        "",
        "| arm | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |",
        "|---|" + "---|" * len(cfg.seeds),
    ]
    for arm in arms:
        row = []
        for s in cfg.seeds:
            st = data[arm].get(s, {}).get("status", {})
            row.append(f"train {st.get('train_wall_s', '–')} · eval {st.get('eval_wall_s', '–')}")
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    all_keys = sorted({k for a in arms for item in data[a].values() for k in item.get("metrics", {})})
    lines += ["## All metrics", "", "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for key in all_keys:
        if key.endswith(
            ("/count", "/samples", "/documents", "/dialogues", "/sequences", "/segments_1x", "/segments_2x", "/tokens")
        ):
            continue
        lines.append(f"| `{key}` | " + " | ".join(_cell(data, a, key, cfg.alpha) for a in arms) + " |")
    notes = sorted({n for a in arms for item in data[a].values() for n in item.get("notes", [])})
    if notes:
        lines += ["", "## Evaluation notes", ""] + [f"* {n}" for n in notes]
    lines += ["", "## Study config (resolved)", "", "```yaml", config_text.rstrip(), "```", ""]
    baseline_yaml = Path(cfg.output_dir) / "runs" / "baseline" / f"seed{cfg.seeds[0]}" / "run.yaml"
    if baseline_yaml.is_file():
        lines += [
            f"## Run config of baseline seed {cfg.seeds[0]}",
            "",
            "```yaml",
            baseline_yaml.read_text().rstrip(),
            "```",
            "",
        ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
