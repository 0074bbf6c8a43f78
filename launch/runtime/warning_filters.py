"""The few third-party warnings Loom's commands hide, each by message and module, never globally: a
deprecation of a pinned dependency must still reach whoever upgrades it."""

from __future__ import annotations

import warnings

KNOWN = (
    # megatron-core on a machine without NVIDIA's fused kernels: Loom never uses them on CPU
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\."),
    # megatron-core's tensor-parallel layers look up the default TP group on every call
    (UserWarning, r".*tp_group.*", r"megatron\.core\.tensor_parallel"),
)


def filter_known_warnings() -> None:
    for category, message, module in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
