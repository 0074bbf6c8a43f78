"""The GPU check's dry run on the CPU: `tests/gpu/run_check.sh --dry-run` runs every check's wiring
(tiny shapes, gloo) and writes the results and the summary a GPU session would get."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.gpu.check import CHECKS
from tests.gpu.common import REPO, STATUSES


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_writes_every_check(tmp_path):
    out = tmp_path / "gpu-out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    env["GPU_CHECK_BUDGET"] = "1500"
    proc = subprocess.run(
        ["bash", "tests/gpu/run_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1700
    )
    summary = (out / "summary.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        bundled = set(tar.getnames())
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["checks"]}
    assert list(results) == [c.name for c in CHECKS], proc.stdout[-3000:]
    for check in CHECKS:
        r = results[check.name]
        assert f"| {check.name} | {r['status']} |" in summary, f"{check.name} missing from summary.md"
        assert r["status"] in STATUSES and r["summary"], r
        assert f"logs/{check.name}.log" in bundled and f"checks/{check.name}.json" in bundled
        assert r["status"] == "pass", f"{check.name}: {r['status']}: {r['summary']}\n{proc.stdout[-3000:]}"
    assert "| check | status | seconds | result |" in proc.stdout  # the table is printed at the end
    bench = (out / "bench.md").read_text()
    assert "| Loom (no technique) |" in bench and "| HF LlamaForCausalLM (sdpa) |" in bench
    assert "Loom step ≤ 0.90× HF Llama (sdpa)" in bench
    assert proc.returncode == (1 if any(r["status"] == "fail" for r in results.values()) else 0)
