"""The techniques' fp32 state when built the way ZeRO-3 builds the model.

DeepSpeed's `zero.Init` replaces torch's tensor constructors while the model is built: each one defaults
to the accelerator and rounds floating results to the run's half dtype. On the H200 this broke SCA (bf16
counts met fp32 ones in `index_add_`) and HCMA (a CPU generator asked to draw on the GPU). The context
below does what those wrappers do, on the CPU, with the `meta` device standing in for the GPU.
"""

import contextlib

import torch

from loom.techniques.config import HCMAConfig, SCAConfig
from loom.techniques.hcma import HCMA
from loom.techniques.sca import SCAHead

CONSTRUCTORS = ("empty", "zeros", "ones", "full", "randn", "tensor", "arange", "eye")


@contextlib.contextmanager
def zero_init_constructors(dtype: torch.dtype, device: torch.device):
    """torch's constructors as zero.Init wraps them: the default device is `device`, floats become `dtype`."""
    originals = {name: getattr(torch, name) for name in CONSTRUCTORS}

    def wrap(fn):
        def wrapped(*args, **kwargs):
            if kwargs.get("device") is None:
                kwargs["device"] = device
            tensor = fn(*args, **kwargs)
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
            return tensor

        return wrapped

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def test_sca_statistics_stay_fp32_and_exact_under_zero_init():
    cfg = SCAConfig(rank=48, window=16)  # 1/48 is not a bf16 number
    plain = SCAHead(64, 50, cfg)
    with zero_init_constructors(torch.bfloat16, torch.device("cpu")):
        built = SCAHead(64, 50, cfg)
    for name in ("mu", "var", "cnt"):
        assert built.get_buffer(name).dtype == torch.float32, name
        assert torch.equal(built.get_buffer(name), plain.get_buffer(name)), name
    ids = torch.randint(0, 50, (300,))
    built.update_field(torch.randn(300, 48), ids)  # fp32 counts: index_add_ takes them
    assert built.cnt.sum().item() == 300


def test_hcma_projection_is_the_same_cpu_fp32_draw_under_zero_init():
    cfg = HCMAConfig(enabled=True, seed=7)
    plain = HCMA(cfg, 64)
    with zero_init_constructors(torch.bfloat16, torch.device("meta")):
        built = HCMA(cfg, 64)
    assert built.projection.device.type == "cpu" and built.projection.dtype == torch.float32
    assert torch.equal(built.projection, plain.projection)
