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
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


def _default_arms() -> Dict[str, List[str]]:
    return {
        "baseline": [],
        "lcm": ["techniques.lcm.enabled=true"],
        "scr": ["techniques.scr.enabled=true"],
        "cmr": ["techniques.cmr.enabled=true"],
        "sca": ["techniques.sca.enabled=true"],
        "hcma": ["techniques.hcma.enabled=true"],
        "all": [
            "techniques.lcm.enabled=true",
            "techniques.scr.enabled=true",
            "techniques.cmr.enabled=true",
            "techniques.sca.enabled=true",
            "techniques.hcma.enabled=true",
        ],
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
    """Runs trained/evaluated at the same time (each with `nproc` processes); their timing metrics then share the
    machine."""
    eval_data: Optional[str] = None
    """Held-out data for `loom eval --data` (None: each run's own eval data)."""
    eval_metrics: str = "all"
    """Metric families for `loom eval --metrics`."""
    eval_settings: List[str] = field(default_factory=list)
    """`loom eval --set` items (sizes and knobs)."""
    alpha: float = 0.05
    """Significance level marked in the report (Welch and paired t-tests, two-sided, no multiple-comparison
    correction)."""
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

    from loom.launch.config import ConfigError

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
        problems.append(
            f"study config: {len(cfg.seeds)} seed(s) given; the study needs at least {cfg.min_seeds} (min_seeds)"
        )
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
            overrides = (
                common
                + list(cfg.arms[arm])
                + [f"train.seed={seed}", f"data.seed={seed}", f"output_dir={folder}", f"name={cfg.name}-{arm}-s{seed}"]
            )
            specs.append(RunSpec(arm, seed, folder, overrides))
    return specs


def _log(msg: str) -> None:
    # One write per line: concurrent runs' threads log at the same time.
    sys.stdout.write(f"[study {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stdout.flush()


def _loom(args: List[str], nproc: int) -> List[str]:
    if nproc == 1:
        return [sys.executable, "-m", "loom.launch.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "loom.launch.cli",
        *args,
    ]


def _run_logged(cmd: List[str], log_file: Path, timeout: float) -> tuple[int, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.perf_counter()
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
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
    from loom.launch.config import load_config, to_yaml

    key = f"{spec.arm}/seed{spec.seed}"
    with lock:
        entry = status.setdefault(key, {})
    spec.folder.mkdir(parents=True, exist_ok=True)
    run_cfg = load_config(cfg.base_config, spec.overrides, world_size=cfg.nproc)
    run_yaml = spec.folder / "run.yaml"
    text = to_yaml(run_cfg)
    if run_yaml.is_file() and run_yaml.read_text() != text and _final_step(spec.folder) is not None:
        raise ValueError(
            f"{run_yaml} differs from the study's config for {key}: the study config changed "
            f"after this run trained; use a new output_dir or delete {spec.folder}"
        )
    run_yaml.write_text(text)
    target = run_cfg.train.max_steps
    done = _final_step(spec.folder)
    if done is not None and done >= target:
        _log(f"{label}: trained ({done} steps), skipping")
    else:
        resume = ["--resume", "auto"] if done is not None else []
        _log(f"{label}: training {target} steps" + (f" (resuming at {done})" if resume else ""))
        code, wall = _run_logged(
            _loom(["train", str(run_yaml), *resume], cfg.nproc), spec.folder / "train.log", cfg.run_timeout_s
        )
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
    from loom.launch.study.report import write_report

    report = write_report(cfg, command, config_text)
    _log(f"report: {report} ({time.perf_counter() - start:.0f} s)")
    status = _load_status(cfg)
    return 1 if any(v.get("error") for v in status.values()) else 0
