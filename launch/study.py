"""`loom study CONFIG [overrides]`: the techniques' study.

Trains every arm (the baseline, each technique alone, all five together) on the same data, the
same number of tokens and the same seeds, evaluates every run with `loom eval`, and writes
`report.md` with the mean ± std over seeds of every metric, a Welch and a paired (by seed) t-test of
each arm against the baseline, and PNG plots (loss curves and the key metrics of each technique's claims).

Layout of `<output_dir>/`:

    study.yaml                     the resolved study config
    runs/<arm>/seed<S>/run.yaml    the resolved run config of that run (trained with `loom train`)
    runs/<arm>/seed<S>/…           its checkpoints, TensorBoard logs, train.log
    runs/<arm>/seed<S>/eval.json   its `loom eval` results (eval.log next to it)
    report.md, *.png               the report

Each run and each evaluation is skipped when already complete (a partial run resumes from its
last checkpoint), so an interrupted study continues where it stopped; `--report-only` rebuilds
the report from what exists. `parallel_runs` runs go at once (one per core on a small machine, one
per node on a cluster), each with `nproc` processes (torchrun when > 1).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def _default_arms() -> Dict[str, List[str]]:
    return {
        "baseline": [],
        "lcm": ["techniques.lcm.enabled=true"],
        "scr": ["techniques.scr.enabled=true"],
        "cmr": ["techniques.cmr.enabled=true"],
        "sca": ["techniques.sca.enabled=true"],
        "hcma": ["techniques.hcma.enabled=true"],
        "all": ["techniques.lcm.enabled=true", "techniques.scr.enabled=true", "techniques.cmr.enabled=true",
                "techniques.sca.enabled=true", "techniques.hcma.enabled=true"],
    }


@dataclass
class StudyConfig:
    name: str = "study"
    """Study name (report title)."""
    output_dir: str = "runs/study"
    """Where runs, evaluations and the report go."""
    base_config: Optional[str] = None
    """Run config YAML every run starts from (None: Loom's defaults)."""
    run: Dict[str, Any] = field(default_factory=dict)
    """Run-config settings applied on top of base_config for every run (a nested mapping)."""
    technique_settings: List[str] = field(default_factory=list)
    """Dotted technique knobs applied to every run (e.g. techniques.sca.warmup_steps=50); they only
    matter in the arms that enable the technique, so every arm shares one set of knobs."""
    arms: Dict[str, List[str]] = field(default_factory=_default_arms)
    """Arm name → dotted overrides that switch its techniques on. `baseline` is the reference."""
    only: List[str] = field(default_factory=list)
    """Run only these arms (empty: all); the baseline is always included."""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds; each sets train.seed and data.seed, identically for every arm."""
    min_seeds: int = 3
    """Refuse to run with fewer seeds (lower it only for tests)."""
    nproc: int = 1
    """Processes per run (torchrun when > 1)."""
    parallel_runs: int = 1
    """Runs trained/evaluated at the same time (each with `nproc` processes); their timing metrics then share the machine."""
    eval_data: Optional[str] = None
    """Held-out data for `loom eval --data` (None: each run's own eval data)."""
    eval_metrics: str = "all"
    """Metric families for `loom eval --metrics`."""
    eval_settings: List[str] = field(default_factory=list)
    """`loom eval --set` items (sizes and knobs)."""
    alpha: float = 0.05
    """Significance level marked in the report (Welch and paired t-tests, two-sided, no multiple-comparison correction)."""
    run_timeout_s: float = 7200.0
    """A training or evaluation run that takes longer than this is stopped and reported as failed."""


@dataclass
class RunSpec:
    arm: str
    seed: int
    folder: Path
    overrides: List[str]


def load_study_config(path: str, overrides: List[str]) -> StudyConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from launch.config import ConfigError

    schema = OmegaConf.structured(StudyConfig)
    try:
        loaded = OmegaConf.load(path) if path else OmegaConf.create({})
        merged = OmegaConf.merge(schema, loaded, OmegaConf.from_dotlist(list(overrides)))
        cfg: StudyConfig = OmegaConf.to_object(merged)
    except FileNotFoundError:
        raise ConfigError([f"study config not found: {path}"]) from None
    except OmegaConfBaseException as exc:
        raise ConfigError([f"study config: {str(exc).splitlines()[0]}"]) from None
    problems = []
    if "baseline" not in cfg.arms:
        problems.append("study config: arms must contain 'baseline' (the reference)")
    unknown = [a for a in cfg.only if a not in cfg.arms]
    if unknown:
        problems.append(f"study config: only names unknown arms {unknown}; arms are {list(cfg.arms)}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        problems.append(f"study config: seeds repeat: {cfg.seeds}")
    if len(cfg.seeds) < cfg.min_seeds:
        problems.append(f"study config: {len(cfg.seeds)} seed(s) given; the study needs at least {cfg.min_seeds} "
                        f"(min_seeds)")
    if cfg.nproc < 1:
        problems.append("study config: nproc must be >= 1")
    if cfg.parallel_runs < 1:
        problems.append("study config: parallel_runs must be >= 1")
    if problems:
        raise ConfigError(problems)
    return cfg


def _flatten(tree: dict, prefix: str = "") -> List[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _flatten(value, path + ".")
        else:
            out.append(f"{path}={_yaml_value(value)}")
    return out


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def arms_of(cfg: StudyConfig) -> List[str]:
    names = list(cfg.arms) if not cfg.only else ["baseline"] + [a for a in cfg.only if a != "baseline"]
    return ["baseline"] + [a for a in names if a != "baseline"]


def plan_runs(cfg: StudyConfig) -> List[RunSpec]:
    root = Path(cfg.output_dir) / "runs"
    common = _flatten(cfg.run) + list(cfg.technique_settings)
    specs = []
    for arm in arms_of(cfg):
        for seed in cfg.seeds:
            folder = root / arm / f"seed{seed}"
            overrides = common + list(cfg.arms[arm]) + [f"train.seed={seed}", f"data.seed={seed}",
                                                         f"output_dir={folder}", f"name={cfg.name}-{arm}-s{seed}"]
            specs.append(RunSpec(arm, seed, folder, overrides))
    return specs


def _log(msg: str) -> None:
    # One write per line: concurrent runs' threads log at the same time.
    sys.stdout.write(f"[study {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stdout.flush()


def _loom(args: List[str], nproc: int) -> List[str]:
    if nproc == 1:
        return [sys.executable, "-m", "launch.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "launch.cli", *args]


def _run_logged(cmd: List[str], log_file: Path, timeout: float) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.perf_counter()
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\nstudy: timed out after {timeout:.0f} s\n")
            code = 124
    return code, time.perf_counter() - start


def _final_step(folder: Path) -> Optional[int]:
    latest = folder / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    meta = folder / "checkpoints" / latest.read_text().strip() / "meta.json"
    if not meta.is_file():
        return None
    return int(json.loads(meta.read_text())["state"]["step"])


def _status_path(cfg: StudyConfig) -> Path:
    return Path(cfg.output_dir) / "status.json"


def _load_status(cfg: StudyConfig) -> dict:
    p = _status_path(cfg)
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_status(cfg: StudyConfig, status: dict) -> None:
    p = _status_path(cfg)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, p)


def execute(cfg: StudyConfig) -> dict:
    """Train and evaluate every planned run that is not complete yet. Returns the status table."""
    from concurrent.futures import ThreadPoolExecutor

    status = _load_status(cfg)
    specs = plan_runs(cfg)
    lock = threading.Lock()

    def one(numbered):
        i, spec = numbered
        _execute_run(cfg, spec, f"({i}/{len(specs)}) {spec.arm}/seed{spec.seed}", status, lock)

    with ThreadPoolExecutor(max_workers=cfg.parallel_runs) as pool:
        list(pool.map(one, enumerate(specs, 1)))
    return status


def _execute_run(cfg: StudyConfig, spec: RunSpec, label: str, status: dict, lock: threading.Lock) -> None:
    """Train (or resume) one run, then evaluate it; records wall times and errors in `status`."""
    from launch.config import load_config, to_yaml

    key = f"{spec.arm}/seed{spec.seed}"
    with lock:
        entry = status.setdefault(key, {})
    spec.folder.mkdir(parents=True, exist_ok=True)
    run_cfg = load_config(cfg.base_config, spec.overrides, world_size=cfg.nproc)
    run_yaml = spec.folder / "run.yaml"
    text = to_yaml(run_cfg)
    if run_yaml.is_file() and run_yaml.read_text() != text and _final_step(spec.folder) is not None:
        raise ValueError(f"{run_yaml} differs from the study's config for {key}: the study config changed "
                         f"after this run trained; use a new output_dir or delete {spec.folder}")
    run_yaml.write_text(text)
    target = run_cfg.train.max_steps
    done = _final_step(spec.folder)
    if done is not None and done >= target:
        _log(f"{label}: trained ({done} steps), skipping")
    else:
        resume = ["--resume", "auto"] if done is not None else []
        _log(f"{label}: training {target} steps" + (f" (resuming at {done})" if resume else ""))
        code, wall = _run_logged(_loom(["train", str(run_yaml), *resume], cfg.nproc), spec.folder / "train.log",
                                 cfg.run_timeout_s)
        done = _final_step(spec.folder)
        with lock:
            entry["train_wall_s"] = round(wall + entry.get("train_wall_s", 0.0), 1)
            if code != 0 or done is None or done < target:
                entry["error"] = f"training exited with code {code} (see {spec.folder / 'train.log'})"
                _log(f"  {key}: FAILED ({entry['error']})")
                _save_status(cfg, status)
                return
        _log(f"  {key}: trained in {wall:.0f} s")
    with lock:
        entry.pop("error", None)
    eval_json = spec.folder / "eval.json"
    if eval_json.is_file() and json.loads(eval_json.read_text()).get("step") == done:
        _log(f"  {key}: evaluated, skipping")
    else:
        args = ["eval", str(spec.folder), "--out", str(eval_json), "--metrics", cfg.eval_metrics]
        if cfg.eval_data:
            args += ["--data", cfg.eval_data]
        if cfg.eval_settings:
            args += ["--set", *cfg.eval_settings]
        code, wall = _run_logged(_loom(args, cfg.nproc), spec.folder / "eval.log", cfg.run_timeout_s)
        with lock:
            entry["eval_wall_s"] = round(wall, 1)
            if code != 0 or not eval_json.is_file():
                entry["error"] = f"evaluation exited with code {code} (see {spec.folder / 'eval.log'})"
                _log(f"  {key}: EVAL FAILED ({entry['error']})")
            else:
                _log(f"  {key}: evaluated in {wall:.0f} s")
    with lock:
        _save_status(cfg, status)


# --------------------------------------------------------------------------------- report
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
    from launch.evaluate import read_run_logs

    status = _load_status(cfg)
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

    # loss curves: mean over seeds with a min–max band
    for tag, name, title in (("train/loss", "loss_curves.png", "training loss"),
                             ("eval/loss", "eval_loss_curves.png", "held-out loss during training")):
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
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats/token)")
            ax.set_title(f"{cfg.name}: {title} (mean over seeds, band = min–max)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            files.append(name)
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
        for ax in list(axes.flat)[len(keys):]:
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
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            files.append(name)
        plt.close(fig)

    lengths = sorted({int(k.split("/")[1][1:]) for a in arms for item in data[a].values()
                      for k in item.get("metrics", {}) if k.startswith("kv_recall/N")})
    series_plot(lambda n: f"kv_recall/N{n}/teacher_forced", lengths, "context length N (tokens)", "kv_recall.png",
                "key-value recall (teacher-forced top-1 over value tokens)", "accuracy")
    from techniques.metrics.recall import BUCKET_NAMES

    series_plot(lambda b: f"retrieval/logit/{b}/top10", list(BUCKET_NAMES), "training frequency", "retrieval.png",
                "next-token retrieval@10 by training-frequency bucket", "top-10 accuracy")
    return files


def write_report(cfg: StudyConfig, command: str, config_text: str) -> Path:
    out = Path(cfg.output_dir)
    data = collect(cfg)
    plots = write_plots(cfg, data, out)
    arms = [a for a in arms_of(cfg) if a in data]
    lines = [f"# {cfg.name}: techniques study", ""]
    n_runs = sum(len(v) for v in data.values())
    n_eval = sum(1 for v in data.values() for item in v.values() if item.get("metrics"))
    lines += [f"Command: `{command}`", "",
              f"Arms: {', '.join(arms)} · seeds: {cfg.seeds} · runs planned: {n_runs} · evaluated: {n_eval}", "",
              "Every arm trains on the same data with the same seeds (each seed sets `train.seed` and `data.seed`) "
              "for the same number of steps and tokens; only the technique switches differ. Cells are "
              "mean ± sample std (ddof = 1) over seeds; `p` is the two-sided Welch t-test "
              "(`scipy.stats.ttest_ind(equal_var=False)`) against the baseline, `pp` the two-sided paired t-test "
              "over the seeds both arms share (`scipy.stats.ttest_rel`; a seed's baseline run is that seed's "
              f"matched control, so pairing removes the between-seed spread); `*` marks a p-value < {cfg.alpha}. "
              "No correction for multiple comparisons: with this many metrics some p < 0.05 are expected by chance, "
              "and with few seeds the test has little power. Metric definitions: TECHNIQUES.md §3.14–§7.14 and "
              "`techniques/metrics/`. Timing metrics (`overhead/*`, `*/ms_per_token`, wall times) are only "
              "comparable between runs made on an otherwise idle machine.", ""]
    failures = [(a, s, item["status"]["error"]) for a in data for s, item in data[a].items()
                if item["status"].get("error")]
    missing = [(a, s) for a in data for s, item in data[a].items() if not item.get("metrics")]
    if failures or missing:
        lines += ["## Incomplete runs", ""]
        lines += [f"* {a} seed {s}: {e}" for a, s, e in failures]
        lines += [f"* {a} seed {s}: no evaluation" for a, s in missing if (a, s) not in {(x, y) for x, y, _ in failures}]
        lines.append("")
    lines += ["## Key metrics (one per claim)", "",
              "| metric | claim | technique | better | " + " | ".join(arms) + " |",
              "|---|---|---|---|" + "---|" * len(arms)]
    for key, claim, tech, better in KEY_METRICS:
        if not any(_values(data, a, key) for a in arms):
            continue
        lines.append(f"| `{key}` | {claim} | {tech} | {better} | " +
                     " | ".join(_cell(data, a, key, cfg.alpha) for a in arms) + " |")
    lines.append("")
    lines += ["## Wall time per run (s)", "", "| arm | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |",
              "|---|" + "---|" * len(cfg.seeds)]
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
        if key.endswith(("/count", "/samples", "/documents", "/dialogues", "/sequences", "/segments_1x",
                         "/segments_2x", "/tokens")):
            continue
        lines.append(f"| `{key}` | " + " | ".join(_cell(data, a, key, cfg.alpha) for a in arms) + " |")
    notes = sorted({n for a in arms for item in data[a].values() for n in item.get("notes", [])})
    if notes:
        lines += ["", "## Evaluation notes", ""] + [f"* {n}" for n in notes]
    lines += ["", "## Study config (resolved)", "", "```yaml", config_text.rstrip(), "```", ""]
    baseline_yaml = Path(cfg.output_dir) / "runs" / "baseline" / f"seed{cfg.seeds[0]}" / "run.yaml"
    if baseline_yaml.is_file():
        lines += [f"## Run config of baseline seed {cfg.seeds[0]}", "", "```yaml", baseline_yaml.read_text().rstrip(),
                  "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def study_from_cli(config: str, overrides: List[str], report_only: bool = False) -> int:
    from omegaconf import OmegaConf

    cfg = load_study_config(config, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    (out / "study.yaml").write_text(config_text)
    command = "loom study " + " ".join([config, *overrides])
    start = time.perf_counter()
    if not report_only:
        _log(f"{cfg.name}: {len(arms_of(cfg))} arms × {len(cfg.seeds)} seeds → {out}")
        status = execute(cfg)
        failed = [k for k, v in status.items() if v.get("error")]
        if failed:
            _log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    report = write_report(cfg, command, config_text)
    _log(f"report: {report} ({time.perf_counter() - start:.0f} s)")
    status = _load_status(cfg)
    return 1 if any(v.get("error") for v in status.values()) else 0
