"""The study report's PNG plots: loss curves, each arm's paired difference from the baseline per key
metric with its 95 % interval (a forest plot), and key-value recall and retrieval against length and
frequency."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List

from loom.launch.study.stats import paired_difference, summarise, values, values_by_seed


def write_plots(
    name: str, arms: List[str], data: dict, keys: List[tuple], significant: Callable, out: Path
) -> List[str]:
    """`keys`: (metric, better) of the forest plot's panels; `significant(arm, metric)` says whether the
    corrected test marks that difference. `data` is `report.collect`'s. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    files: List[str] = []

    def save(fig, ax, file, xlabel, ylabel, title):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        files.append(file)

    _loss_curves(plt, name, arms, data, colors, save)
    files += _forest(plt, name, arms, data, keys, significant, colors, out)
    _series(plt, arms, data, colors, save)
    return files


def _loss_curves(plt, name, arms, data, colors, save) -> None:
    import numpy as np

    for tag, file, title in (
        ("train/loss", "loss_curves.png", "training loss"),
        ("eval/loss", "eval_loss_curves.png", "held-out loss during training"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        drew = False
        for arm in arms:
            curves = [item["curves"].get(tag, {}) for item in data[arm].values() if item["curves"].get(tag)]
            steps = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
            if not steps:
                continue
            arr = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, arr.mean(0), label=f"{arm} (n={len(curves)})", color=colors[arm], lw=1.4)
            if len(curves) > 1:
                ax.fill_between(steps, arr.min(0), arr.max(0), color=colors[arm], alpha=0.15)
            drew = True
        if drew:
            save(fig, ax, file, "step", "loss (nats/token)", f"{name}: {title} (mean over seeds, band = min–max)")
        plt.close(fig)


def _forest(plt, name, arms, data, keys, significant, colors, out) -> List[str]:
    """One panel per metric: each arm's mean paired difference from the baseline (arm − baseline, seed by
    seed) with its 95 % t-interval; filled markers where the corrected test is significant."""
    others = [a for a in arms if a != "baseline"]
    panels = []
    for key, better in keys:
        base = values_by_seed(data, "baseline", key)
        rows = [(arm, paired_difference(values_by_seed(data, arm, key), base)) for arm in others]
        rows = [(arm, d) for arm, d in rows if d[3] > 0 and math.isfinite(d[0])]
        if rows:
            panels.append((key, better, rows))
    if not panels:
        return []
    cols = 4
    n_rows = math.ceil(len(panels) / cols)
    height = (0.35 * len(others) + 1.6) * n_rows
    fig, grid = plt.subplots(n_rows, cols, figsize=(4.2 * cols, height), squeeze=False)
    axes = list(grid.flat)
    for ax, (key, better, rows) in zip(axes, panels):
        for y, (arm, (mean, low, high, _count)) in enumerate(rows):
            if math.isfinite(low):
                ax.plot([low, high], [y, y], color=colors[arm], lw=2)
            filled = significant(arm, key)
            ax.plot(
                [mean], [y], "o", color=colors[arm], markerfacecolor=colors[arm] if filled else "white", markersize=6
            )
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([arm for arm, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{key}\n(better: {better})", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"{name}: paired difference from the baseline (arm − baseline per seed; mean and 95 % t-interval; "
        "filled = significant after the correction)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "paired_differences.png", dpi=100)
    plt.close(fig)
    return ["paired_differences.png"]


def _series(plt, arms, data, colors, save) -> None:
    """Recall against context length and retrieval@10 against training frequency (mean ± std over seeds)."""
    from loom.techniques.metrics.recall import BUCKET_NAMES

    def series_plot(key_of, xs, xlabel, file, title, ylabel):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drew = False
        for arm in arms:
            points = [(i, summarise(values(data, arm, key_of(x)))) for i, x in enumerate(xs)]
            points = [(i, m, s) for i, (m, s, n) in points if n]
            if points:
                pos, means, stds = zip(*points)
                ax.errorbar(pos, means, yerr=stds, label=arm, color=colors[arm], marker="o", capsize=3, lw=1.2)
                drew = True
        if drew:
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(x) for x in xs])
            save(fig, ax, file, xlabel, ylabel, title)
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
        "key-value recall (teacher-forced top-1 over value tokens; mean ± std over seeds)",
        "accuracy",
    )
    series_plot(
        lambda b: f"retrieval/logit/{b}/top10",
        list(BUCKET_NAMES),
        "training frequency",
        "retrieval.png",
        "next-token retrieval@10 by training-frequency bucket (mean ± std over seeds)",
        "top-10 accuracy",
    )
