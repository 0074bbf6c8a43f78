"""Shared pytest set-up: single-threaded torch, offline Hugging Face, heavy imports done once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Forked test ranks must not inherit a live OpenMP pool from the parent.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _heavy_imports():
    from tests.harness import preimport_heavy_modules

    preimport_heavy_modules()
