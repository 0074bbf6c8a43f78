"""The equivalence checks hold whichever CPU kernels torch and MKL pick, not only this machine's.

A float32 reduction's rounding depends on the kernels (AVX-512, AVX2 or the portable default; MKL's
own code path), which differ between CPUs: bounds tuned on one CPU used to fail on another. Here a
representative subset of the equivalence tests runs again in a fresh interpreter under kernel
settings other than this machine's native ones (ATEN_CPU_CAPABILITY is read when torch loads).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBSET = [
    "tests/parallel/test_layouts.py::test_layout_matches_single_process[tp2-pp1-dp1]",  # TP, ZeRO 0-3
    "tests/techniques/test_in_model.py::test_all_techniques_match_single_process[2-1]",  # the techniques, TP
    "tests/techniques/test_in_model.py::test_techniques_match_single_process_under_data_parallel_zero",  # DP
]
SETTINGS = {
    "portable-kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2-mkl-compatible": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_equivalence_under_other_cpu_kernels(setting):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(SETTINGS[setting])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"{setting} {SETTINGS[setting]}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert f"{len(SUBSET)} passed" in run.stdout, run.stdout[-2000:]
