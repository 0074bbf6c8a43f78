"""Byte accounting for the memory tables: distinct tensor storages, saved activations, and the
tensors DeepSpeed's ZeRO optimizers keep in their own attributes."""

from __future__ import annotations


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    import torch

    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


class SavedTensorMeter:
    """Bytes of the activations autograd saves for backward during one step (distinct storages,
    parameters excluded): with one micro-batch this is what is alive at the end of the forward."""

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen: dict[int, int] = {}

    def _pack(self, t):
        import torch

        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self.exclude:
                self.seen[ptr] = max(self.seen.get(ptr, 0), s.nbytes())
        return t

    def context(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def optimizer_tensors(optimizer) -> list:
    """Moments of the inner torch optimizer and DeepSpeed's fp32 master partitions (a separate copy
    even in fp32 runs)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    out = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        out += [t for t in getattr(optimizer, name, None) or [] if torch.is_tensor(t)]
    return out


def zero_grad_buffers(optimizer) -> list:
    """Gradient storage inside DeepSpeed's ZeRO optimizers (gradient partitions; buckets separately)."""
    import torch

    out = []
    for name in ("averaged_gradients", "grads_in_partition", "all_grad_tensors"):
        value = getattr(optimizer, name, None)
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for v in value:
                items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
                out += [t for t in items if torch.is_tensor(t)]
        elif torch.is_tensor(value):
            out.append(value)
    for name in ("_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",):
        value = getattr(optimizer, name, None)
        if isinstance(value, dict):
            out += [t for t in value.values() if torch.is_tensor(t)]
    return out


def zero_buckets(optimizer) -> list:
    """DeepSpeed's reduce buckets (`reduce_bucket_size` elements per dtype)."""
    import torch

    out = []
    buckets = getattr(optimizer, "ipg_buckets", None)
    if isinstance(buckets, dict):
        for bucket in buckets.values():
            buffer = getattr(bucket, "buffer", None)
            if torch.is_tensor(buffer):  # ZeRO-3: one flat tensor (never iterate over it)
                out.append(buffer)
            elif isinstance(buffer, (list, tuple)):
                out += [t for t in buffer if torch.is_tensor(t)]
    return out
