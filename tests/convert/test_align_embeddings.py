"""`loom convert align-embeddings`: HCMA offline mode applied to a trained checkpoint."""

import subprocess
import sys

import pytest
import torch

from loom.launch.checkpoint.consolidated import read_consolidated
from loom.launch.checkpoint.reader import load
from tests.e2e.runner import REPO, loom_env

pytestmark = pytest.mark.slow  # every test here needs checkpoints that conftest.py trains through torchrun


def test_align_embeddings_moves_directions_keeps_norms_and_the_rest(ckpt_tp2_pp2, tmp_path):
    out = tmp_path / "aligned"
    proc = subprocess.run(
        [sys.executable, "-m", "loom.launch.cli", "convert", "align-embeddings", ckpt_tp2_pp2, str(out)],
        cwd=REPO,
        env=loom_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = load(ckpt_tp2_pp2), read_consolidated(out)
    old, new = before.weights["embedding.weight"], after.weights["embedding.weight"]
    assert (new - old).abs().max() > 1e-4, "the table did not move"
    assert torch.allclose(new.norm(dim=1), old.norm(dim=1), rtol=1e-4), "row norms must be re-applied"
    for name, value in before.weights.items():
        if name != "embedding.weight":
            assert torch.equal(after.weights[name], value), name
