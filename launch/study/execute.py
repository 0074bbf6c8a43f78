"""`loom study CONFIG [overrides]`: the techniques' study — training and evaluating every run.

Trains every arm (the baseline, each technique alone, all five together) on the same data, the
same number of tokens and the same seeds, evaluates every run with `loom eval` (the study's
`eval_profile`; each run's kNN overlap against the same seed's baseline, so it measures the structure a
technique keeps or changes, not drift from a random init), and writes `report.md` (`launch.study.report`).

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
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

from loom.launch.runtime.env import loom_command
from loom.launch.study.config import (
    RunSpec,
    StudyConfig,
    arms_of,
    load_status,
    load_study_config,
    plan_runs,
    save_status,
)

log = logging.getLogger(__name__)


def _log(msg: str) -> None:
    # concurrent runs' threads log at the same time: the clock tells their lines apart
    log.info(f"[study {time.strftime('%H:%M:%S')}] {msg}")


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
    """The step of a run's newest intact checkpoint, None before its first."""
    from loom.launch.checkpoint.locate import newest_intact
    from loom.launch.checkpoint.meta import read_meta

    newest, _ = newest_intact(folder)
    return None if newest is None else int(read_meta(newest)["state"]["step"])


def execute(cfg: StudyConfig) -> dict:
    """Train and evaluate every planned run that is not complete yet. Returns the status table."""
    from concurrent.futures import ThreadPoolExecutor

    status = load_status(cfg)
    specs = plan_runs(cfg)
    lock = threading.Lock()
    baselines = {spec.seed: spec.folder for spec in specs if spec.arm == "baseline"}
    baseline_done = {seed: threading.Event() for seed in baselines}

    def baseline_reference(seed: int) -> Optional[Path]:
        # baselines are queued first, so every one has started before a run waits here
        baseline_done[seed].wait()
        return baselines[seed] if _final_step(baselines[seed]) is not None else None

    def one(numbered):
        i, spec = numbered
        try:
            _execute_run(cfg, spec, f"({i}/{len(specs)}) {spec.arm}/seed{spec.seed}", status, lock, baseline_reference)
        finally:
            if spec.arm == "baseline":
                baseline_done[spec.seed].set()

    with ThreadPoolExecutor(max_workers=cfg.parallel_runs) as pool:
        list(pool.map(one, enumerate(specs, 1)))
    return status


def _execute_run(
    cfg: StudyConfig, spec: RunSpec, label: str, status: dict, lock: threading.Lock, baseline_reference
) -> None:
    """Train (or resume) one run, then evaluate it against its seed's baseline (`baseline_reference(seed)`:
    the baseline's run folder once it has trained, None if it failed); records wall times and errors."""
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
            loom_command(["train", str(run_yaml), *resume], cfg.nproc), spec.folder / "train.log", cfg.run_timeout_s
        )
        done = _final_step(spec.folder)
        with lock:
            entry["train_wall_s"] = round(wall + entry.get("train_wall_s", 0.0), 1)
            if code != 0 or done is None or done < target:
                entry["error"] = f"training exited with code {code} (see {spec.folder / 'train.log'})"
                _log(f"  {key}: FAILED ({entry['error']})")
                save_status(cfg, status)
                return
        _log(f"  {key}: trained in {wall:.0f} s")
    with lock:
        entry.pop("error", None)
    eval_json = spec.folder / "eval.json"
    reference = (
        spec.folder if spec.arm == "baseline" else baseline_reference(spec.seed)
    )  # the baseline: 1 by definition
    settings = list(cfg.eval_settings) + ([f"reference={reference}"] if reference is not None else [])
    if reference is None:
        _log(f"  {key}: no baseline checkpoint for seed {spec.seed}: kNN overlap against the run's own step-0 table")
    if _evaluated(eval_json, done, cfg.eval_profile, str(reference or "")):
        _log(f"  {key}: evaluated, skipping")
    else:
        args = ["eval", str(spec.folder), "--out", str(eval_json), "--metrics", cfg.eval_metrics]
        args += ["--profile", cfg.eval_profile]
        if cfg.eval_data:
            args += ["--data", cfg.eval_data]
        if settings:
            args += ["--set", *settings]
        code, wall = _run_logged(loom_command(args, cfg.nproc), spec.folder / "eval.log", cfg.run_timeout_s)
        with lock:
            entry["eval_wall_s"] = round(wall, 1)
            if code != 0 or not eval_json.is_file():
                entry["error"] = f"evaluation exited with code {code} (see {spec.folder / 'eval.log'})"
                _log(f"  {key}: EVAL FAILED ({entry['error']})")
            else:
                _log(f"  {key}: evaluated in {wall:.0f} s")
    with lock:
        save_status(cfg, status)


def _evaluated(eval_json: Path, step: Optional[int], profile: str, reference: str) -> bool:
    """Whether `eval_json` already holds this run's evaluation at `step` with this profile and reference."""
    if not eval_json.is_file():
        return False
    result = json.loads(eval_json.read_text())
    return (
        result.get("step") == step
        and result.get("profile") == profile
        and (result.get("settings") or {}).get("reference", "") == reference
    )


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
    status = load_status(cfg)
    return 1 if any(v.get("error") for v in status.values()) else 0
