"""The techniques study's report: collect every run's evaluation and training curves; per claim, each arm's
paired (by seed) difference from the baseline with its 95 % interval, the paired t-test, the Holm
correction over all the claims' tests and a helps / no effect / hurts verdict; every metric's mean ± std
with uncorrected tests; the plots (`launch.study.plots`); `report.md` (`launch/study/execute.py` runs the
study, `launch.study.stats` holds the statistics)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

from loom.launch.study.config import StudyConfig, arms_of, load_status, plan_runs
from loom.launch.study.plots import write_plots
from loom.launch.study.stats import (
    benjamini_hochberg,
    holm,
    paired,
    paired_difference,
    summarise,
    values,
    values_by_seed,
    verdict,
    welch,
)

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
    ("geometry/knn10_overlap", "kNN@10 structure vs the same seed's baseline (1 = same)", "HCMA", "context"),
    ("geometry/low_density_fraction", "fewer fragmented tokens", "HCMA", "lower"),
    ("overhead/train_tokens_per_s", "training overhead (tokens/s)", "all", "higher"),
    ("overhead/inference_ms_per_token", "inference overhead (ms/token)", "all", "lower"),
]


def collect(cfg: StudyConfig) -> dict:
    """{arm: {seed: {"metrics", "notes", "profile", "overrides", "knn_reference", "curves", "status"}}}"""
    from loom.launch.eval.aggregate import read_run_logs

    status = load_status(cfg)
    data: Dict[str, Dict[int, dict]] = {}
    for spec in plan_runs(cfg):
        item: dict = {"status": status.get(f"{spec.arm}/seed{spec.seed}", {})}
        ev = spec.folder / "eval.json"
        if ev.is_file():
            result = json.loads(ev.read_text())
            item["metrics"] = result.get("metrics", {})
            item["notes"] = result.get("notes", [])
            for key in ("profile", "overrides", "knn_reference"):
                item[key] = result.get(key)
        logs = read_run_logs(spec.folder)
        item["curves"] = {k: v for k, v in logs.items() if k in ("train/loss", "eval/loss", "train/grad_norm")}
        data.setdefault(spec.arm, {})[spec.seed] = item
    return data


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.2e}"
    return f"{x:.4f}" if a < 10 else f"{x:.2f}"


def _cell(data, arm, key, alpha) -> str:
    """mean ± std over seeds, and for an arm the uncorrected Welch (p) and paired (pp) p-values."""
    vals = values(data, arm, key)
    mean, std, n = summarise(vals)
    if n == 0:
        return "–"
    text = f"{_fmt(mean)} ± {_fmt(std)}"
    if arm != "baseline":
        p = welch(vals, values(data, "baseline", key))
        pp = paired(values_by_seed(data, arm, key), values_by_seed(data, "baseline", key))
        tests = [f"{name}={v:.2g}{'*' if v < alpha else ''}" for name, v in (("p", p), ("pp", pp)) if math.isfinite(v)]
        if tests:
            text += f" ({' · '.join(tests)})"
    return text


def claim_tests(data: dict, arms: List[str], alpha: float) -> List[dict]:
    """One row per (claim, arm tested for it): the technique's own arm and the all-five arm (every arm for a
    claim of all techniques), with the paired difference, its interval, the paired p-value, the Holm and
    Benjamini-Hochberg adjusted p-values over every row, and the verdict from the Holm-adjusted p-value."""
    rows = []
    for key, claim, technique, better in KEY_METRICS:
        named = [t.strip().lower() for t in technique.split(",")]
        tested = [a for a in arms if a != "baseline" and (a in named or a == "all" or "all" in named)]
        base = values_by_seed(data, "baseline", key)
        for arm in tested:
            mine = values_by_seed(data, arm, key)
            if not mine or not base:
                continue
            mean, low, high, n = paired_difference(mine, base)
            rows.append(
                dict(key=key, claim=claim, technique=technique, better=better, arm=arm, n=n, diff=mean, low=low,
                     high=high, p=paired(mine, base), base=summarise(list(base.values())),
                     value=summarise(list(mine.values())))
            )  # fmt: skip
    for row, p_holm, q_bh in zip(rows, holm([r["p"] for r in rows]), benjamini_hochberg([r["p"] for r in rows])):
        row["p_holm"], row["q_bh"] = p_holm, q_bh
        row["verdict"] = verdict(row["diff"], p_holm, row["better"], alpha)
    return rows


def _claims_section(rows: List[dict], alpha: float) -> List[str]:
    m = sum(1 for r in rows if math.isfinite(r["p"]))
    lines = [
        "## Claims: each arm against the baseline",
        "",
        f"One row per claim and arm tested for it (the technique's own arm and all five together). Δ is the paired "
        "difference arm − baseline, seed by seed, with its 95 % t-interval; `p` the two-sided paired t-test "
        f"(`scipy.stats.ttest_1samp` of the differences); `p (Holm)` the Holm–Bonferroni adjusted p-value over all "
        f"m = {m} tests of this table (family-wise error rate {alpha}); `q (BH)` the Benjamini–Hochberg adjusted "
        f"p-value over the same tests, for reference. Verdict from the Holm-adjusted p: **helps** / **hurts** "
        f"when it is below {alpha} and Δ goes the claim's way / against it, *differs* for a metric without a better "
        "direction, *no effect* otherwise (not distinguishable at this many seeds, which is not proof of no effect).",
        "",
        "| claim | metric | better | arm | baseline | arm | Δ [95 % CI] | p | p (Holm) | q (BH) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f"{_fmt(r['diff'])} [{_fmt(r['low'])}, {_fmt(r['high'])}]"
        verdict_text = f"**{r['verdict']}**" if r["verdict"] in ("helps", "hurts") else r["verdict"]
        lines.append(
            f"| {r['claim']} | `{r['key']}` | {r['better']} | {r['arm']} | {_fmt(r['base'][0])} ± {_fmt(r['base'][1])} "
            f"| {_fmt(r['value'][0])} ± {_fmt(r['value'][1])} | {ci} | {_fmt(r['p'])} | {_fmt(r['p_holm'])} "
            f"| {_fmt(r['q_bh'])} | {verdict_text} |"
        )
    return lines + [""]


def _evaluation_line(data: dict) -> str:
    """How the runs were evaluated: the profile, --set overrides and the kNN reference, as the eval.json say."""
    profiles = sorted({
        f"{item.get('profile') or 'unknown'}"
        + ("" if not item.get("overrides") else " with " + ", ".join(
            f"{k}={v}" for k, v in sorted(item["overrides"].items()) if k != "reference"))
        for runs in data.values() for item in runs.values() if item.get("metrics")
    })  # fmt: skip
    against_baseline = all(
        (item.get("overrides") or {}).get("reference")
        for runs in data.values()
        for item in runs.values()
        if item.get("metrics")
    )
    knn = (
        "every run against the same seed's baseline (the baseline itself: 1)"
        if against_baseline
        else "not every run against its baseline (see the evaluation notes)"
    )
    return f"Evaluation profile: {'; '.join(profiles) or '–'}. kNN@10 overlap: {knn}."


def write_report(cfg: StudyConfig, command: str, config_text: str) -> Path:
    out = Path(cfg.output_dir)
    data = collect(cfg)
    arms = [a for a in arms_of(cfg) if a in data]
    claims = claim_tests(data, arms, cfg.alpha)
    marked = {(r["arm"], r["key"]) for r in claims if math.isfinite(r["p_holm"]) and r["p_holm"] < cfg.alpha}
    forest = [(key, better) for key, _, _, better in KEY_METRICS if key != "loss/perplexity"]
    plots = write_plots(cfg.name, arms, data, forest, lambda arm, key: (arm, key) in marked, out)
    lines = [f"# {cfg.name}: techniques study", ""]
    n_runs = sum(len(v) for v in data.values())
    n_eval = sum(1 for v in data.values() for item in v.values() if item.get("metrics"))
    lines += [
        f"Command: `{command}`",
        "",
        f"Arms: {', '.join(arms)} · seeds: {cfg.seeds} · runs planned: {n_runs} · evaluated: {n_eval}",
        "",
        _evaluation_line(data),
        "",
        "Every arm trains on the same data with the same seeds (each seed sets `train.seed` and `data.seed`) "
        "for the same number of steps and tokens; only the technique switches differ, so a seed's baseline run "
        "is the matched control of that seed's arm. Metric definitions: docs/techniques.md (each technique's "
        "evaluation metrics) and `techniques/metrics/`. Timing metrics (`overhead/*`, `*/ms_per_token`, wall "
        "times) are only comparable between runs made on an otherwise idle machine.",
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
    lines += _claims_section(claims, cfg.alpha)
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
    lines += [
        "## All metrics (uncorrected)",
        "",
        "Mean ± sample std (ddof = 1) over seeds; for an arm, `p` is the two-sided Welch t-test "
        "(`scipy.stats.ttest_ind(equal_var=False)`) against the baseline and `pp` the two-sided paired t-test "
        f"over the seeds both arms share; `*` marks p < {cfg.alpha} **without** correction for the many metrics "
        "(exploratory: some are expected by chance; the claims table above is the corrected one).",
        "",
        "| metric | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
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
