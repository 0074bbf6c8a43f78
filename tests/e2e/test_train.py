"""`loom train` end to end: exact resume, atomic checkpoints, SIGTERM, NaN skipping, TensorBoard."""

import math
import re
import shutil
import signal
import subprocess

import pytest

from loom.launch.checkpoint.layout import MANIFEST
from loom.launch.checkpoint.locate import find_resumable, newest_intact
from tests.e2e.runner import REPO, TINY, loom_command, loom_env, rank_process, read_scalars, run_loom

QUIET = ["train.log_every=1", "train.eval_every=0"]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline,zero", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, pipeline, zero):
    common = [
        f"parallel.pipeline={pipeline}",
        f"parallel.zero_stage={zero}",
        "train.max_steps=6",
        "checkpoint.every=3",
        "data.num_workers=1",
        *QUIET,
    ]
    first = tmp_path / "uninterrupted"
    run_loom(["train", TINY, f"output_dir={first}", *common], nproc=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    out = run_loom(["train", TINY, f"output_dir={resumed}", *common, "--resume", "auto"], nproc=2)
    assert "resumed from" in out.stdout and "at step 3" in out.stdout
    want = read_scalars(first / "tensorboard")["train/loss"]
    got = read_scalars(resumed / "tensorboard")["train/loss"]
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == want[step], f"step {step}: resumed {got[step]!r} != uninterrupted {want[step]!r}"


ALL_FIVE = [
    "techniques.lcm.enabled=true",
    "techniques.lcm.K=4",
    "techniques.scr.enabled=true",
    "techniques.scr.rank=8",
    "techniques.cmr.enabled=true",
    "techniques.cmr.rank=8",
    "techniques.sca.enabled=true",
    "techniques.sca.rank=8",
    "techniques.sca.window=16",
    "techniques.sca.warmup_steps=2",
    "techniques.sca.buffer_sync_every=2",
    "techniques.hcma.enabled=true",
    "techniques.hcma.K1=8",
    "techniques.hcma.K2=32",
    "techniques.hcma.proj_dim=16",
    "techniques.hcma.refresh_every=2",
    "techniques.hcma.lambda_hcma=0.01",
]


@pytest.mark.slow
def test_all_five_techniques_resume_exactly(tmp_path):
    """SCA's statistics (model buffers) and HCMA's refresh state travel with checkpoints: a resumed
    run with every technique on reproduces the uninterrupted losses, across pipeline stages."""
    common = [
        "parallel.pipeline=2",
        "parallel.zero_stage=1",
        "train.max_steps=6",
        "checkpoint.every=3",
        *ALL_FIVE,
        *QUIET,
    ]
    first = tmp_path / "uninterrupted"
    run_loom(["train", TINY, f"output_dir={first}", *common], nproc=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    run_loom(["train", TINY, f"output_dir={resumed}", *common, "--resume", "auto"], nproc=2)
    want = read_scalars(first / "tensorboard")["train/loss"]
    got = read_scalars(resumed / "tensorboard")["train/loss"]
    assert {s: got[s] for s in (4, 5, 6)} == {s: want[s] for s in (4, 5, 6)}


@pytest.mark.slow
def test_all_five_techniques_train_stably_on_real_text(tmp_path):
    run = tmp_path / "run"
    run_loom(["train", TINY, f"output_dir={run}", "train.max_steps=30", "checkpoint.every=0", *ALL_FIVE, *QUIET])
    scalars = read_scalars(run / "tensorboard")
    losses = [scalars["train/loss"][s] for s in sorted(scalars["train/loss"])]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert scalars["train/skipped_steps"][30] == 0
    technique_tags = [t for t in scalars if t.startswith("techniques/")]
    for needle in ("lcm/gate_mean", "scr/relevance_mean", "reweave/attn_entropy", "sca/l_field", "hcma/"):
        assert any(needle in t for t in technique_tags), f"no {needle} scalar in {technique_tags}"


@pytest.mark.slow
def test_monitoring_scalars_and_partial_checkpoints(tmp_path):
    run = tmp_path / "run"
    out = run_loom(
        [
            "train",
            TINY,
            f"output_dir={run}",
            "train.max_steps=4",
            "checkpoint.every=2",
            "train.eval_every=2",
            "train.log_every=1",
        ],
        nproc=1,
    )
    scalars = read_scalars(run / "tensorboard")
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "throughput/tokens_per_s",
        "throughput/tflops_per_rank",
        "throughput/mfu",
        "time/step_s",
        "time/data_wait_fraction",
        "memory/rss_gb",
        "train/consumed_tokens",
        "train/skipped_steps",
        "eval/loss",
        "eval/perplexity",
    ):
        assert tag in scalars, f"{tag} missing from TensorBoard; have {sorted(scalars)}"
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    # tiny.yaml: micro_batch_size 4 × microbatches 2 × seq_length 64 per step
    assert scalars["train/consumed_tokens"] == {s: 4 * 2 * 64 * s for s in range(1, 5)}
    assert "TensorBoard: tensorboard --logdir" in out.stdout

    # a checkpoint killed mid-write has no manifest: it is skipped and the previous one is used
    ckpts = run / "checkpoints"
    broken = ckpts / "step_00000009"
    shutil.copytree(ckpts / "step_00000004", broken)
    (broken / MANIFEST).unlink()
    corrupted = ckpts / "step_00000008"
    shutil.copytree(ckpts / "step_00000004", corrupted)
    victim = next(p for p in sorted(corrupted.rglob("*.pt")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    found, warnings = newest_intact(run)
    assert found == ckpts / "step_00000004"
    assert any("step_00000009" in w and "incomplete" in w for w in warnings)
    assert any("step_00000008" in w and "sha256" in w for w in warnings)


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["train", TINY, f"output_dir={run}", "train.max_steps=100000", "checkpoint.every=0", *QUIET]
    proc = subprocess.Popen(
        loom_command(args, nproc=2),
        cwd=REPO,
        env=loom_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            # one rank only: the ranks agree on the stop at the next step boundary, so both save and exit 75
            rank_process(proc.pid, 1).send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    text = "".join(seen) + rest
    # torchrun exits 1 when a rank fails (README, Slurm section) and names the exit code of the first rank to
    # end: 75 (it then stops the other one, which may already be tearing down); rank 0 reports its own code
    assert proc.returncode != 0, "a preempted run must not report success"
    stopped = re.search(r"finished at step (\d+) \(exit code (\d+)\)", text)
    assert stopped and stopped.group(2) == "75", text[-3000:]
    assert re.search(r"exitcode\s*:\s*75\b", text), text[-3000:]
    assert "checkpoint saved" in text, text[-3000:]
    folder = find_resumable(run)
    assert folder is not None and folder.name == f"step_{int(stopped.group(1)):08d}"
    out = run_loom(
        [
            "train",
            TINY,
            f"output_dir={run}",
            "train.max_steps=" + str(int(folder.name[5:]) + 1),
            *QUIET,
            "--resume",
            "auto",
        ],
        nproc=2,
    )
    assert f"resumed from {folder}" in out.stdout


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    run = tmp_path / "run"
    out = run_loom(
        ["train", TINY, f"output_dir={run}", "train.max_steps=10", "train.max_consecutive_nonfinite=3", *QUIET],
        env={"LOOM_FAULT_NAN_STEPS": "2,4,5,6"},
        check=False,
    )
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    skipped = read_scalars(run / "tensorboard")["train/skipped_steps"]
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[7] == 4
    assert "non-finite" in out.stdout
    folder = find_resumable(run)
    assert folder is not None and folder.name == "step_00000007", "stops with a (finite) checkpoint"


def test_a_run_that_raises_exits_with_its_traceback(tmp_path):
    """An exception mid-run (loader workers alive) ends the process: it once hung at interpreter exit,
    multiprocessing joining the workers while they waited for the loader the traceback kept alive."""
    out = run_loom(
        ["train", TINY, f"output_dir={tmp_path / 'run'}", "train.max_steps=6", "data.num_workers=1", *QUIET],
        env={"LOOM_FAULT_RAISE": "2"},
        check=False,
        timeout=120,
    )
    assert out.returncode != 0
    assert "LOOM_FAULT_RAISE: injected error after step 2" in out.stdout + out.stderr
