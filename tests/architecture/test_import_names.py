"""Loom installs as `loom.*` only: a user's own `model.py`, `data.py`, `launch.py` or `techniques.py`
in the working directory (common in a training project) is never imported instead of Loom's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runner import TINY

QUICK = ["train.max_steps=1", "train.eval_every=0", "train.log_every=1", "checkpoint.every=0", "data.num_workers=0"]


def _user_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("model", "data", "launch", "techniques"):
        (project / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    return project


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_top_level_names_are_not_installed():
    """Nothing outside `loom` is importable from the installed package (no generic `model`, `data` …)."""
    code = (
        "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
        "print([n for n in ('model', 'data', 'launch', 'techniques') if importlib.util.find_spec(n)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["loom", "torchrun"])
def test_training_ignores_a_users_model_and_data_modules(tmp_path, launcher):
    project = _user_project(tmp_path)
    args = ["train", TINY, f"output_dir={tmp_path / 'run'}", *QUICK]
    if launcher == "loom":
        cmd = [str(Path(sys.executable).parent / "loom"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
        cmd += ["-m", "loom.launch.cli", *args]
    out = subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "was imported" not in out.stdout + out.stderr
    assert "finished at step 1" in out.stdout
