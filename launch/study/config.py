"""The study's configuration and plan: which arms and seeds, the run each trains, and the status file
that makes an interrupted study resume (`launch.study.execute` runs it, `launch.study.report` reports it).
"""

from __future__ import annotations

import json
import os
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
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Seeds; each sets train.seed and data.seed, identically for every arm."""
    min_seeds: int = 5
    """Refuse to run with fewer seeds (lower it only for tests): with 3 seeds a paired t-test has 2 degrees of
    freedom and almost no power after a multiple-comparison correction."""
    nproc: int = 1
    """Processes per run (torchrun when > 1)."""
    parallel_runs: int = 1
    """Runs trained/evaluated at the same time (each with `nproc` processes); their timing metrics then share the
    machine."""
    eval_data: Optional[str] = None
    """Held-out data for `loom eval --data` (None: each run's own eval data)."""
    eval_metrics: str = "all"
    """Metric families for `loom eval --metrics`."""
    eval_profile: str = "spec"
    """`loom eval --profile`: `spec` (the metrics' own sizes; hours per evaluation on a CPU) or `quick` (CPU sizes)."""
    eval_settings: List[str] = field(default_factory=list)
    """`loom eval --set` items on top of the profile (sizes and knobs). `reference` is set by the study itself: every
    run's kNN overlap compares with the same seed's baseline."""
    alpha: float = 0.05
    """Significance level of the report: the claims' verdicts use paired t-tests with the Holm correction over all
    the claims' tests (family-wise); the all-metrics table marks uncorrected p-values."""
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
    from loom.launch.eval.settings import PROFILES

    if cfg.eval_profile not in PROFILES:
        problems.append(f"study config: eval_profile must be one of {list(PROFILES)}, got {cfg.eval_profile!r}")
    if any(item.startswith("reference=") for item in cfg.eval_settings):
        problems.append("study config: eval_settings must not set reference (each run is compared with its baseline)")
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


def status_path(cfg: StudyConfig) -> Path:
    return Path(cfg.output_dir) / "status.json"


def load_status(cfg: StudyConfig) -> dict:
    p = status_path(cfg)
    return json.loads(p.read_text()) if p.is_file() else {}


def save_status(cfg: StudyConfig, status: dict) -> None:
    p = status_path(cfg)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, p)
