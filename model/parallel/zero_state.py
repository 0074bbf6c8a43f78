"""The DeepSpeed adapter: every DeepSpeed internal Loom relies on is reached through this module.

Loom drives DeepSpeed's ZeRO optimizers in ways its public API does not cover: per-micro-batch ZeRO-2
reduction under Loom's own pipeline schedule, writing full weights (and Adam's moments) into the fp32
master partitions when a run starts from consolidated weights at a new layout, and per-rank memory
accounting. Those touch private or undocumented attributes. Keeping them here means a DeepSpeed
upgrade breaks one file, and `tests/model/test_zero_state.py` has one test per internal listed in
`INTERNALS`, so the break shows up as a named failing test instead of a wrong run.

The on-disk checkpoint format (key names inside DeepSpeed's `.pt` files) is read in one place too:
`launch/checkpoint/read_deepspeed.py`.

Like `comm`, this module imports only torch (and DeepSpeed, lazily), so every package may use it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

INTERNALS = {
    # name: (owner, what Loom uses it for)
    "ds_id": ("ZeRO-3 parameter", "tells a partitioned parameter apart"),
    "ds_shape": ("ZeRO-3 parameter", "the full (TP-local) shape of a partitioned parameter"),
    "ds_tensor": ("ZeRO-3 parameter", "this rank's partition of the working copy"),
    "ds_process_group": ("ZeRO-3 parameter", "the group a parameter is partitioned over"),
    "_z3_optimizer": ("ZeRO-3 parameter", "the optimizer owning its fp32 master"),
    "_get_fp32_opt_state_partition": ("DeepSpeedZeroOptimizer_Stage3", "fp32 master / Adam state partition"),
    "_get_param_partition_rank": ("DeepSpeedZeroOptimizer_Stage3", "which DP rank a partition belongs to"),
    "fp32_partitioned_groups_flat": ("DeepSpeedZeroOptimizer_Stage3", "flat fp32 master sub-groups"),
    "_hp_mapping": ("ZeRO-1/2 parameter", "where its fragment sits in the flat fp32 partition"),
    "single_partition_of_fp32_groups": ("DeepSpeedZeroOptimizer", "flat fp32 master partitions"),
    "ipg_buckets": ("DeepSpeedZeroOptimizer", "reduce buckets, primed per micro-batch under PP"),
    "set_gradient_accumulation_boundary": ("DeepSpeedZeroOptimizer", "marks the last micro-batch of a step"),
    "overlapping_partition_gradients_reduce_epilogue": ("DeepSpeedZeroOptimizer", "flushes a micro-batch's buckets"),
    "reduce_gradients": ("DeepSpeedZeroOptimizer", "ZeRO-1 reduction after Loom's pipeline schedule"),
    "fp16_groups": ("FP16_UnfusedOptimizer (bf16 ZeRO-0)", "working parameters, paired with fp32_groups"),
    "fp32_groups": ("FP16_UnfusedOptimizer (bf16 ZeRO-0)", "per-parameter fp32 masters"),
    "averaged_gradients": ("DeepSpeedZeroOptimizer", "gradient partitions (memory accounting)"),
    "grads_in_partition": ("DeepSpeedZeroOptimizer", "gradient partitions (memory accounting)"),
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition": (
        "DeepSpeedZeroOptimizer_Stage3",
        "gradient partitions (memory accounting)",
    ),
    "_z3_leaf": ("nn.Module", "makes a module one ZeRO-3 gather unit (set through set_z3_leaf_module)"),
}


# ------------------------------------------------------------------------------------- parameters
def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its data is a placeholder; the values live in partitions)."""
    return hasattr(param, "ds_id")


def local_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape this rank's module gives the parameter (before ZeRO-3 partitioning)."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def local_partition(param: torch.Tensor) -> torch.Tensor:
    """The values this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor if is_partitioned(param) else param


def gathered(params, modifier_rank: int | None = None):
    """Full values of ZeRO-3 parameters inside the block (a no-op for ordinary parameters). With
    `modifier_rank`, writes made there on that rank are re-partitioned at exit. Collective over DP."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def gathered_for_write(param: torch.Tensor):
    """Write the whole of `param` in the block (every DP rank computes the same value)."""
    return gathered([param], modifier_rank=0)


def mark_zero3_leaf(module: torch.nn.Module) -> None:
    """ZeRO-3 gathers a leaf module's parameters once for its whole forward (needed when a forward reads
    a child's weight before calling the child)."""
    from deepspeed.utils import set_z3_leaf_module

    set_z3_leaf_module(module, True)


def set_full_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a parameter's fp32 master (any ZeRO stage) and its working copy with `value`.
    Collective over the DP group (ZeRO-3 re-partitions)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.float())
    with gathered_for_write(param):
        param.data.copy_(value.to(param.dtype))


# ------------------------------------------------------------------------------------- pipeline + ZeRO
def zero2_begin_micro_batch(engine, is_last: bool) -> None:
    """What `engine.backward` does before each micro-batch for ZeRO-2's per-bucket reduction, for
    backward passes driven by Loom's pipeline schedule instead."""
    zero = engine.optimizer
    zero.set_gradient_accumulation_boundary(is_last)
    for dtype, bucket in zero.ipg_buckets.items():
        if zero.contiguous_gradients and not bucket.buffer:
            bucket.buffer.append(
                torch.empty(int(zero.reduce_bucket_size), dtype=dtype, device=torch.device(engine.device))
            )
            bucket.index = 0


def zero2_end_micro_batch(engine) -> None:
    engine.optimizer.overlapping_partition_gradients_reduce_epilogue()


def zero1_reduce_after_pipeline(engine) -> None:
    """ZeRO-1 under PP: reduce the gradients accumulated over all micro-batches once."""
    engine.optimizer.reduce_gradients(pipeline_parallel=True)


# ------------------------------------------------------------------------------------- masters
def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _step_tensor(step: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(step), dtype=torch.float32, device=like.device)


class MasterWriter:
    """Writes full (TP-local) values into a live engine's parameters: the fp32 master partition of any
    ZeRO stage, the working copy, and optionally Adam's `exp_avg`/`exp_avg_sq` and step."""

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, engine, optimizer_step: float | None = None):
        self.engine, self.base = engine, _base_optimizer(engine)
        self.step = optimizer_step
        zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        if optimizer_step is not None and zero > 0:
            self._create_flat_state(optimizer_step)
        opt = engine.optimizer
        # bf16 ZeRO-0 runs DeepSpeed's unfused mixed-precision optimizer: an fp32 copy per parameter
        self.masters = {}
        if (
            hasattr(opt, "fp16_groups")
            and hasattr(opt, "fp32_groups")
            and not hasattr(opt, "fp32_partitioned_groups_flat")
        ):
            self.masters = {
                id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)
            }

    def _create_flat_state(self, step: float) -> None:
        """ZeRO optimizers create Adam's state lazily at the first step; create it now (zeros and the
        step count) on each flat fp32 partition so that fragments can be written into it."""
        flats = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 sub-groups
        if flats is None:
            flats = [flat for group in self.base.param_groups for flat in group["params"]]
        for flat in flats:
            if flat.numel() == 0:
                continue
            state = self.base.state[flat]
            for key in self.MOMENTS:
                if key not in state:
                    state[key] = torch.zeros_like(flat)
            state["step"] = _step_tensor(step, flat)

    def write(self, param: torch.Tensor, value: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
        """`value` and `moments` are full TP-local tensors of `local_shape(param)`, fp32."""
        if is_partitioned(param):
            self._write_zero3(param, value, moments)
        elif hasattr(param, "_hp_mapping"):
            self._write_zero12(param, value, moments)
        else:
            self._write_zero0(param, value, moments)

    def _write_zero3(self, param, value, moments) -> None:
        opt = getattr(param, "_z3_optimizer", None)
        if opt is not None:
            _z3_set_partition(opt, param, value)
            for key, t in moments.items():
                _z3_set_partition(opt, param, t, key)
        part = param.ds_tensor
        group = param.ds_process_group
        rank = dist.get_rank(group=group) if group is not None else 0
        piece = value.reshape(-1)[rank * part.numel() : (rank + 1) * part.numel()]
        part.data.zero_()
        part.data[: piece.numel()].copy_(piece.to(part.dtype))

    def _write_zero12(self, param, value, moments) -> None:
        mapping = param._hp_mapping  # None when the parameter lies wholly in another DP rank's partition
        if mapping is not None:
            lp = mapping.lp_fragment_address
            hp = mapping.get_hp_fragment_address()
            flat = self.base.param_groups[mapping.param_group_index]["params"][0]
            flat.data.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
            for key, t in moments.items():
                self.base.state[flat][key].narrow(0, hp.start, hp.numel).copy_(
                    t.reshape(-1).narrow(0, lp.start, lp.numel)
                )
        param.data.copy_(value.to(param.dtype))  # every DP rank holds the whole working copy

    def _write_zero0(self, param, value, moments) -> None:
        master = self.masters.get(id(param), param)
        param.data.copy_(value.to(param.dtype))
        if master is not param:
            master.data.copy_(value.to(master.dtype))
        if moments and self.step is not None:
            state = self.base.state[master]
            for key, t in moments.items():
                state[key] = t.to(master.dtype).reshape(master.shape).clone()
            state["step"] = _step_tensor(self.step, master)


def _z3_set_partition(opt, param, value: torch.Tensor, key: str | None = None) -> None:
    """This rank's slice of a full value into the ZeRO-3 fp32 master (or Adam state `key`).
    DeepSpeed's own `set_full_hp_param` overruns the last rank's slice when the parameter does not
    divide by the DP size (its partition is zero-padded), so the padding is written here."""
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = opt._get_param_partition_rank(param)
    flat = value.reshape(-1).to(part.dtype)
    piece = flat[rank * part.numel() : (rank + 1) * part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)


# ------------------------------------------------------------------------------------- memory views
def fp32_master_partitions(optimizer) -> list[torch.Tensor]:
    """DeepSpeed's flat fp32 master partitions (a separate copy even in fp32 runs)."""
    out = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        out += [t for t in getattr(optimizer, name, None) or [] if torch.is_tensor(t)]
    return out


def gradient_partitions(optimizer) -> list[torch.Tensor]:
    """Gradient storage inside DeepSpeed's ZeRO optimizers (buckets separately)."""
    out: list[torch.Tensor] = []
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
    value = getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
    if isinstance(value, dict):
        out += [t for t in value.values() if torch.is_tensor(t)]
    return out


def reduce_buckets(optimizer) -> list[torch.Tensor]:
    """DeepSpeed's reduce buckets (`reduce_bucket_size` elements per dtype)."""
    out: list[torch.Tensor] = []
    buckets = getattr(optimizer, "ipg_buckets", None)
    if isinstance(buckets, dict):
        for bucket in buckets.values():
            buffer = getattr(bucket, "buffer", None)
            if torch.is_tensor(buffer):  # ZeRO-3: one flat tensor (never iterate over it)
                out.append(buffer)
            elif isinstance(buffer, (list, tuple)):
                out += [t for t in buffer if torch.is_tensor(t)]
    return out
