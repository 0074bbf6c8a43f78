"""CPU shim for megatron-core 0.16.x and DeepSpeed 0.19.x; every patch is inert when CUDA exists.

What running both on a CPU-only machine showed:
- megatron-core hard-codes CUDA in a few places that Loom reaches on CPU: scratch buffers are placed on
  `torch.cuda.current_device()`, some paths call `torch.cuda.synchronize()`, and tensor-parallel weight
  initialisation forks the CUDA RNG tracker. Here the device lookup returns the CPU, synchronising is a
  no-op, and the tracker is replaced by one with the same semantics on the CPU default generator.
- DeepSpeed on its CPU accelerator JIT-builds a shared-memory all-reduce op (2-4 minutes of C++ with
  `-march=native`) at its first `init_distributed`. The op serves AutoTP inference only, which training
  never calls, so the build is skipped (tests/parallel/test_zero_memory.py checks that no JIT build runs).
Loom's own code paths never branch on CPU vs GPU outside this file.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

_MEGATRON_PATCHED = False
_DEEPSPEED_PATCHED = False


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The CUDA tracker's semantics on the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def apply_megatron_shim() -> bool:
    """Patch megatron-core's CUDA assumptions on a CPU-only machine. Returns True if it patched."""
    global _MEGATRON_PATCHED
    if torch.cuda.is_available() or _MEGATRON_PATCHED:
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    _install_cpu_rng_tracker()
    _MEGATRON_PATCHED = True
    return True


def setup_deepspeed_env() -> None:
    """Select DeepSpeed's CPU accelerator without JIT C++ builds, and quiet torch 2.13's
    per-collective deprecation warnings that ZeRO triggers every step."""
    global _DEEPSPEED_PATCHED
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings(
        "ignore",
        category=FutureWarning,
        message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    )
    if _DEEPSPEED_PATCHED:
        return
    import deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # the shm all-reduce op serves AutoTP inference only; training never calls it
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _DEEPSPEED_PATCHED = True


def apply() -> None:
    """Everything Loom needs before building models or engines on this machine."""
    apply_megatron_shim()
    setup_deepspeed_env()
