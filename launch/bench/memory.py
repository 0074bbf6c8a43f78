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

    def __init__(self, exclude=(), hidden_size: int | None = None):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen: dict[int, int] = {}
        self.hidden_size = hidden_size
        self.residual: set[int] = set()  # storages saved as [s, b, hidden_size]-like activations

    def _pack(self, t):
        import torch

        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self.exclude:
                self.seen[ptr] = max(self.seen.get(ptr, 0), s.nbytes())
                if self.hidden_size is not None and t.ndim >= 3 and t.shape[-1] == self.hidden_size:
                    self.residual.add(ptr)
        return t

    def context(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    @property
    def residual_bytes(self) -> int:
        """The part saved as [s, b, hidden_size]-like activations (not weights): the residual stream, the
        norms' inputs and outputs and what the techniques keep of them, which tensor parallelism leaves
        whole on every rank (its split tensors are heads, FFN or vocabulary columns wide)."""
        return sum(self.seen[ptr] for ptr in self.residual)


def optimizer_tensors(optimizer) -> list:
    """Moments of the inner torch optimizer and DeepSpeed's fp32 master partitions (a separate copy
    even in fp32 runs)."""
    import torch

    from loom.model.parallel.zero_state import fp32_master_partitions

    inner = getattr(optimizer, "optimizer", optimizer)
    out = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return out + fp32_master_partitions(optimizer)
