"""`loom bench` runs end to end and prints its tables (the harness, not the timings: nothing here
asserts a speed; the numbers live in docs/performance.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_quick_prints_every_table(tmp_path):
    # a fresh interpreter: the benchmark forks its workers from a parent that has never run a
    # multi-threaded torch op, which the pytest process cannot promise
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, "-m", "loom.launch.cli", "bench", "--quick", "--silent", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for heading in (
        "Hardware ceiling",
        "Targets",
        "Peers",
        "Technique overhead",
        "Parallel layouts",
        "ZeRO stages",
        "Sequence parallelism",
        "Data path",
    ):
        assert f"### {heading}" in text, f"missing section {heading!r}:\n{text}"
    for row in (
        "HF `LlamaForCausalLM` (sdpa)",
        "megatron-core `GPTModel`",
        "| all five |",
        "| ZeRO-3 |",
        "| TP2 |",
        "loader, num_workers=0",
    ):
        assert row in text, f"missing row {row!r}:\n{text}"
    # every table row is complete (no empty cells from a failed measurement)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows and all("|  |" not in row and "nan" not in row.lower() for row in rows), text
    # ZeRO per-rank bytes follow the theory (a property of the harness's accounting, not of timing)
    zero_rows = [row for row in rows if row.startswith("| ZeRO-")]
    assert len(zero_rows) == 4 and all(row.count("(1.00×)") == 3 for row in zero_rows), "\n".join(zero_rows)
    # sequence parallelism splits exactly the hidden-width activations: their ratio is 1/TP (accounting again)
    sp_rows = [row.split(" | ") for row in rows if row.startswith(("| TP2 | baseline", "| TP2 | all five", "| TP4 | "))]
    assert len(sp_rows) == 4 and all(cells[3] == cells[4] for cells in sp_rows), "\n".join(map(str, sp_rows))
    assert out.read_text().startswith("<!-- written by `loom bench --quick`")
    ext = tmp_path / "ext"
    assert not ext.exists() or os.listdir(ext) == [], "the benchmark triggered a DeepSpeed JIT build"


def test_bench_cli_rejects_unknown_section(capsys):
    from loom.launch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--sections", "peers,nope"])
    assert exc.value.code == 2
    assert "unknown section" in capsys.readouterr().err


@pytest.mark.distributed
def test_bench_interleaved_section_prints_its_rows(tmp_path):
    """The `interleaved` section alone, one round: PP4 with v=1 and v=2 at 4 and 8 micro-batches."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    command = ["bench", "--quick", "--silent", "--sections", "interleaved", "--rounds", "1", "--warmup", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "loom.launch.cli", *command, "--out", str(tmp_path / "bench.md")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "### Interleaved pipeline schedule" in text, text
    for micro, bubble_v1, bubble_v2 in ((4, "43%", "27%"), (8, "27%", "16%")):
        assert f"| PP4, {micro} micro-batches, 1F1B (v=1) |" in text, text
        assert f"| PP4, {micro} micro-batches, interleaved v=2 |" in text, text
        rows = [line for line in text.splitlines() if line.startswith(f"| PP4, {micro} ")]
        assert bubble_v1 in rows[0] and bubble_v2 in rows[1], rows


@pytest.mark.distributed
def test_bench_scaling_section_prints_its_rows(tmp_path):
    """The `scaling` section alone, one round: this machine's DP2 point beside the model, then the
    extrapolated table (1B and 7B at 8-1,024 GPUs) and one finding per model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    command = ["bench", "--quick", "--silent", "--sections", "scaling", "--rounds", "1", "--warmup", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "loom.launch.cli", *command, "--out", str(tmp_path / "bench.md")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "### Scaling: data-parallel step time measured here" in text, text
    for row in ("| one rank's compute", "| gloo all-reduce of", "| DP2 step (ZeRO-0"):
        assert row in text, f"missing row {row!r}:\n{text}"
    for model in ("1B", "7B"):
        for gpus in ("8", "16", "64", "256", "1,024"):
            assert f"| {model} | {gpus} |" in text, f"missing {model} at {gpus} GPUs:\n{text}"
        assert f"**{model}** (" in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert all("|  |" not in row and "nan" not in row.lower() for row in rows), text
    assert all(row.count("(100%)") == 4 for row in rows if row.startswith(("| 1B | 8 |", "| 7B | 8 |")))
