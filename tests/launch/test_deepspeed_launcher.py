"""launch/deepspeed/run_deepspeed.sh on one node: the DeepSpeed runner starts 2 CPU (gloo) ranks."""

from __future__ import annotations

import pytest

from tests.launch.conftest import QUICK, REPO, TINY, free_port, job_env, loss_curve


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks_on_one_node(tiny_data, tmp_path, procs):
    run = tmp_path / "run"
    env = job_env({"NUM_GPUS": "2", "MASTER_PORT": str(free_port())})
    proc = procs(
        [REPO / "launch" / "deepspeed" / "run_deepspeed.sh", TINY, f"output_dir={run}", "train.max_steps=4", *QUICK],
        tmp_path / "deepspeed.log",
        env=env,
    )
    rc = proc.wait(timeout=300)
    log = proc.text()
    assert rc == 0, log[-5000:]
    assert "num_local_procs=2" in log and "dist_world_size=2" in log, log[-3000:]
    assert "2 process(es) via deepspeed" in log, log[-3000:]
    assert "finished at step 4 (exit code 0)" in log
    assert (run / "checkpoints" / "step_00000004").is_dir()
    assert sorted(loss_curve(run)) == [1, 2, 3, 4]
