"""Loom's interleaved 1F1B pipeline schedule (`parallel.virtual_stages` v > 1).

Each of the p pipeline ranks holds v model chunks; virtual stage k = chunk·p + rank, so activations go
rank 0 → 1 → … → p-1 and then back to rank 0's next chunk. A rank runs its forwards and backwards in
megatron-core's interleaved order (`rank_order`): micro-batches in groups of p per chunk, a longer
warm-up on earlier ranks, then one forward and one backward in turn. The pipeline then fills and drains
in steps of one chunk instead of one whole stage, which cuts the idle fraction from (p-1)/(m+p-1) to
(p-1)/(v·m+p-1).

Communication is planned before the step (`slot_plan`): every rank simulates the same schedule, one
piece of work per rank per slot, each as soon as its input has arrived. A message produced in slot t is
sent in slot t's exchange and received there by its peer, which posts the matching receive in the same
slot. So all ranks walk the same number of slots, every exchange pairs sends and receives posted
together, no slot waits on a later one (deadlock-free), and between two ranks the messages of one
direction are in the same order on both sides, which is all NCCL matches point-to-point messages by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from loom.model.parallel import comm
from loom.model.parallel.pipeline import Specs, _default_backward

FORWARD, BACKWARD = "forward", "backward"


@dataclass(frozen=True)
class Work:
    """One forward or backward of one micro-batch through one model chunk of a rank."""

    kind: str
    microbatch: int
    chunk: int


@dataclass(frozen=True)
class Message:
    """Tensors crossing to or from `peer` (a rank of the pipeline group) in one slot: an activation
    (input of the receiver's forward) or a gradient (input of the receiver's backward), for the
    receiver's `microbatch` and `chunk`."""

    kind: str
    peer: int
    microbatch: int
    chunk: int


@dataclass
class Slot:
    work: Optional[Work] = None
    sends: list[Message] = field(default_factory=list)
    recvs: list[Message] = field(default_factory=list)


def check_interleaving(pp: int, microbatches: int, virtual_stages: int) -> None:
    """The same rule `ParallelConfig.validate` states, for callers that bypass the config."""
    if virtual_stages > 1 and (pp < 2 or microbatches % pp):
        raise ValueError(
            f"the interleaved schedule needs pipeline > 1 and micro-batches a multiple of the pipeline size "
            f"(pipeline {pp}, micro-batches {microbatches}, virtual_stages {virtual_stages})"
        )


def _chunk_table(pp: int, microbatches: int, virtual_stages: int) -> list[tuple[int, int]]:
    """(micro-batch, chunk) of the k-th forward: groups of p micro-batches, each through chunk 0, 1, …"""
    table = []
    for first in range(0, microbatches, pp):
        group = range(first, min(first + pp, microbatches))
        table += [(mb, chunk) for chunk in range(virtual_stages) for mb in group]
    return table


def warmup_forwards(pp: int, rank: int, microbatches: int, virtual_stages: int) -> int:
    """Forwards a rank runs before its first backward. Without interleaving the 1F1B count (p-rank-1);
    with it megatron-core's: two per later rank plus one group of p per extra chunk."""
    total = microbatches * virtual_stages
    if virtual_stages == 1:
        return min(pp - rank - 1, total)
    return min((pp - rank - 1) * 2 + (virtual_stages - 1) * pp, total)


def rank_order(pp: int, rank: int, microbatches: int, virtual_stages: int) -> list[Work]:
    """Every forward and backward of one rank, in the order it runs them."""
    check_interleaving(pp, microbatches, virtual_stages)
    table = _chunk_table(pp, microbatches, virtual_stages)
    total = len(table)
    warmup = warmup_forwards(pp, rank, microbatches, virtual_stages)

    def forward(k: int) -> Work:
        return Work(FORWARD, *table[k])

    def backward(k: int) -> Work:  # backwards walk the chunks last to first
        mb, chunk = table[k]
        return Work(BACKWARD, mb, virtual_stages - 1 - chunk)

    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def slot_plan(pp: int, microbatches: int, virtual_stages: int) -> list[list[Slot]]:
    """Per rank, the slots of one step: the work (if any) and the messages sent and received. All ranks
    get the same number of slots; each message is in the sender's and the receiver's same slot."""
    orders = [rank_order(pp, r, microbatches, virtual_stages) for r in range(pp)]
    last_virtual = pp * virtual_stages - 1
    position = [0] * pp
    arrived: list[set] = [set() for _ in range(pp)]
    plan: list[list[Slot]] = [[] for _ in range(pp)]
    while any(position[r] < len(orders[r]) for r in range(pp)):
        slots = [Slot() for _ in range(pp)]
        arriving: list[set] = [set() for _ in range(pp)]
        for r in range(pp):
            if position[r] == len(orders[r]):
                continue
            work = orders[r][position[r]]
            virtual = work.chunk * pp + r
            needs_input = virtual > 0 if work.kind == FORWARD else virtual < last_virtual
            key = (work.kind, work.microbatch, work.chunk)
            if needs_input:
                if key not in arrived[r]:
                    continue  # waits for its input; the rank idles this slot
                arrived[r].remove(key)
            slots[r].work = work
            position[r] += 1
            if work.kind == FORWARD and virtual < last_virtual:
                peer, peer_chunk = (r + 1) % pp, work.chunk + (1 if r == pp - 1 else 0)
            elif work.kind == BACKWARD and virtual > 0:
                peer, peer_chunk = (r - 1) % pp, work.chunk - (1 if r == 0 else 0)
            else:
                continue
            slots[r].sends.append(Message(work.kind, peer, work.microbatch, peer_chunk))
            slots[peer].recvs.append(Message(work.kind, r, work.microbatch, peer_chunk))
            arriving[peer].add((work.kind, work.microbatch, peer_chunk))
        if all(slot.work is None for slot in slots):
            raise RuntimeError(f"the pipeline order stalls at positions {position}: no rank can run its next work")
        for r in range(pp):
            arrived[r] |= arriving[r]
            plan[r].append(slots[r])
    return plan


def forward_backward_interleaved(
    stage_forward: Callable,
    microbatches: list,
    pp_group,
    specs: Specs,
    device: torch.device,
    virtual_stages: int,
    backward: Callable = _default_backward,
    before_backward: Callable | None = None,
    after_backward: Callable | None = None,
) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch through every model chunk of this rank.

    stage_forward(microbatch, received_or_None, chunk) returns the dict of tensors for the next
    virtual stage, or the scalar loss on the last one. As in `forward_backward_1f1b`, each loss is
    scaled by 1/len(microbatches), the hooks run around every backward (index counting this rank's
    backwards, the flag marking its last) and the per-micro-batch losses return on the rank holding
    the last virtual stage."""
    size, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    n = len(microbatches)
    last_virtual = size * virtual_stages - 1
    total_backwards = n * virtual_stages
    inputs: dict = {}  # (kind, micro-batch, chunk) → received activations or gradients
    saved: dict = {}  # (micro-batch, chunk) → (received activations, output) awaiting backward
    losses: list[torch.Tensor] = []
    backwards_done = 0

    def run_forward(work: Work) -> Optional[dict]:
        received = inputs.pop((FORWARD, work.microbatch, work.chunk), None)
        y = stage_forward(microbatches[work.microbatch], received, work.chunk)
        if work.chunk * size + rank == last_virtual:
            losses.append(y.detach().clone())
            saved[work.microbatch, work.chunk] = (received, y / n)
            return None
        saved[work.microbatch, work.chunk] = (received, y)
        return {k: v.detach() for k, v in y.items()}

    def run_backward(work: Work) -> Optional[dict]:
        nonlocal backwards_done
        received, y = saved.pop((work.microbatch, work.chunk))
        grads_in = inputs.pop((BACKWARD, work.microbatch, work.chunk), None)
        is_last = backwards_done == total_backwards - 1
        if before_backward is not None:
            before_backward(backwards_done, is_last)
        if grads_in is None:
            backward([y], None)
        else:
            names = [k for k, v in y.items() if v.requires_grad]
            backward([y[k] for k in names], [grads_in[k] for k in names])
        if after_backward is not None:
            after_backward(backwards_done, is_last)
        backwards_done += 1
        if received is None:
            return None
        return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in received.items()}

    for slot in slot_plan(size, n, virtual_stages)[rank]:
        outgoing = None
        if slot.work is not None:
            outgoing = (run_forward if slot.work.kind == FORWARD else run_backward)(slot.work)
        sends = [(outgoing[name], ranks[msg.peer]) for msg in slot.sends for name in specs]
        received = {msg: _buffers(specs, device, msg.kind == FORWARD) for msg in slot.recvs}
        recvs = [(received[msg][name], ranks[msg.peer]) for msg in slot.recvs for name in specs]
        with torch.no_grad():  # receive buffers may require grad; filling them is no autograd operation
            comm.exchange(sends, recvs, pp_group)
        for msg, tensors in received.items():
            inputs[msg.kind, msg.microbatch, msg.chunk] = tensors
    return losses


def _buffers(specs: Specs, device: torch.device, requires_grad: bool) -> dict:
    out = {}
    for name, (shape, dtype) in specs.items():
        t = torch.empty(shape, dtype=dtype, device=device)
        out[name] = t.requires_grad_(requires_grad and dtype.is_floating_point)
    return out


@torch.no_grad()
def forward_only_interleaved(
    stage_forward: Callable, microbatches: list, pp_group, specs: Specs, device: torch.device, virtual_stages: int
) -> list:
    """Forward every micro-batch through every virtual stage in turn (evaluation); returns the outputs
    of the last virtual stage on its rank ([] elsewhere). Each hand-over is one blocking exchange between
    two neighbours, posted by both in the same order, so the chain cannot deadlock."""
    size, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    previous, following = ranks[(rank - 1) % size], ranks[(rank + 1) % size]
    last_virtual = size * virtual_stages - 1
    outputs = []
    for mb in microbatches:
        for chunk in range(virtual_stages):
            virtual = chunk * size + rank
            received = None
            if virtual > 0:
                received = _buffers(specs, device, False)
                comm.exchange([], [(received[name], previous) for name in specs], pp_group)
            y = stage_forward(mb, received, chunk)
            if virtual == last_virtual:
                outputs.append(y)
            else:
                comm.exchange([(y[name], following) for name in specs], [], pp_group)
    return outputs
