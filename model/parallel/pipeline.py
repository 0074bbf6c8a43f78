"""Loom's non-interleaved 1F1B pipeline schedule over `batch_isend_irecv` on the PP group.

Stages exchange a fixed, named set of tensors (the hidden state plus SCR's ρ and CMR's bank when
those are on), with shapes known from the config on every stage, so receive buffers are static.
Each send is posted together with its matching receive, so the order of blocking calls cannot
deadlock, and the same code runs on gloo and NCCL. Hooks around every micro-batch backward let
ZeRO-2 reduce gradients per micro-batch.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch
import torch.distributed as dist

from loom.model.parallel import comm

Specs = dict  # name -> (shape, dtype)


class StageLink:
    def __init__(self, pp_group, specs: Specs, device: torch.device):
        self.group, self.specs, self.device = pp_group, specs, device
        ranks = dist.get_process_group_ranks(pp_group)
        r = dist.get_rank(pp_group)
        self.first, self.last = r == 0, r == len(ranks) - 1
        self.prev = None if self.first else ranks[r - 1]
        self.next = None if self.last else ranks[r + 1]

    def _buffers(self, requires_grad: bool) -> dict:
        out = {}
        for name, (shape, dtype) in self.specs.items():
            t = torch.empty(shape, dtype=dtype, device=self.device)
            out[name] = t.requires_grad_(requires_grad and dtype.is_floating_point)
        return out

    def _exchange(self, send: Optional[dict], peer_send, recv_from, want_grad: bool) -> Optional[dict]:
        sends = [(send[name], peer_send) for name in self.specs] if send is not None else []
        received = self._buffers(want_grad) if recv_from is not None else None
        recvs = [(received[name], recv_from) for name in self.specs] if received is not None else []
        with torch.no_grad():  # receive buffers may require grad; filling them is no autograd operation
            comm.exchange(sends, recvs, self.group)
        return received

    def recv_forward(self):
        return None if self.first else self._exchange(None, None, self.prev, True)

    def send_forward(self, y: dict):
        if not self.last:
            self._exchange({k: v.detach() for k, v in y.items()}, self.next, None, False)

    def recv_backward(self):
        return None if self.last else self._exchange(None, None, self.next, False)

    def send_backward(self, grads: Optional[dict]):
        if not self.first:
            self._exchange(grads, self.prev, None, False)

    def send_forward_recv_backward(self, y: dict):
        if self.last:
            return None
        return self._exchange({k: v.detach() for k, v in y.items()}, self.next, self.next, False)

    def send_backward_recv_forward(self, grads: Optional[dict]):
        if self.first:
            return None
        return self._exchange(grads, self.prev, self.prev, True)


def _default_backward(tensors, grads):
    torch.autograd.backward(tensors, grad_tensors=grads)


def forward_backward_1f1b(
    stage_forward: Callable,
    microbatches: list,
    pp_group,
    specs: Specs,
    device: torch.device,
    backward: Callable = _default_backward,
    before_backward: Callable | None = None,
    after_backward: Callable | None = None,
) -> list[torch.Tensor]:
    """Run forward and backward of every micro-batch through this rank's stage.

    stage_forward(microbatch, received_or_None) returns the dict of tensors for the next stage, or
    the scalar loss on the last stage. Gradients accumulate with each loss scaled by
    1/len(microbatches). Returns the per-micro-batch (unscaled, detached) losses on the last stage.
    """
    link = StageLink(pp_group, specs, device)
    n, size, rank = len(microbatches), dist.get_world_size(pp_group), dist.get_rank(pp_group)
    warmup = min(size - rank - 1, n)
    steady = n - warmup
    in_flight: deque = deque()
    losses: list[torch.Tensor] = []
    done = [0]

    def run_forward(i: int, received):
        y = stage_forward(microbatches[i], received)
        if link.last:
            losses.append(y.detach().clone())
            y = y / n
        in_flight.append((received, y))
        return y

    def run_backward(grads_in: Optional[dict]):
        received, y = in_flight.popleft()
        i = done[0]
        if before_backward is not None:
            before_backward(i, i == n - 1)
        if link.last:
            backward([y], None)
        else:
            names = [k for k, v in y.items() if v.requires_grad]
            backward([y[k] for k in names], [grads_in[k] for k in names])
        if after_backward is not None:
            after_backward(i, i == n - 1)
        done[0] += 1
        if received is None:
            return None
        return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in received.items()}

    for i in range(warmup):
        link.send_forward(run_forward(i, link.recv_forward()))
    received = link.recv_forward() if steady > 0 else None
    for i in range(steady):
        grads = link.send_forward_recv_backward(run_forward(warmup + i, received))
        grads_out = run_backward(grads)
        if i == steady - 1:
            link.send_backward(grads_out)
        else:
            received = link.send_backward_recv_forward(grads_out)
    for _ in range(warmup):
        link.send_backward(run_backward(link.recv_backward()))
    return losses


@torch.no_grad()
def forward_only(stage_forward: Callable, microbatches: list, pp_group, specs: Specs, device: torch.device) -> list:
    """Forward every micro-batch through the stages (evaluation, generation); returns the last
    stage's outputs ([] on other stages). Model chunks: `pipeline_interleaved.forward_only_interleaved`."""
    link = StageLink(pp_group, specs, device)
    outputs = []
    for mb in microbatches:
        received = link.recv_forward()
        if received is not None:
            received = {k: v.detach() for k, v in received.items()}
        y = stage_forward(mb, received)
        if link.last:
            outputs.append(y)
        else:
            link.send_forward(y)
    return outputs
