"""An analytic model of one data-parallel training step at N GPUs: compute from a FLOP count and an
achieved FLOP/s, gradient and parameter communication from ring collectives over a two-level network
(NVLink inside a node, InfiniBand between nodes), per ZeRO stage, with and without overlap.

Pure Python: `loom bench --sections scaling` (section_scaling) calibrates it against what it measures
on this machine and extrapolates it to GPU clusters; tests/bench/test_scaling_model.py checks the
formulas with known answers.

Every hardware figure is a named constant below, with where it comes from; all of them are parameters
(`Link`, `Cluster`), so the extrapolation can be rerun on other assumptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# ------------------------------------------------------------------ the stated cluster (public spec sheets)
H100_BF16_DENSE_FLOPS = 989e12
"""NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16 tensor-core peak (1,979 with 2:4 sparsity)."""
ACHIEVED_MFU = 0.45
"""Model FLOPs utilisation assumed for a dense GPT training step on H100 in bf16; large-model training
reports typically land between 40 and 55 %. The extrapolation's compute term scales with it."""
GPUS_PER_NODE = 8
"""An HGX/DGX H100 node: 8 GPUs on one NVLink/NVSwitch fabric."""
NVLINK_BANDWIDTH = 450e9
"""Bytes/s per GPU per direction: NVLink 4 gives an H100 SXM5 900 GB/s in total, i.e. 450 GB/s each way
(the spec; NCCL reaches somewhat less in practice, so intra-node figures are on the optimistic side)."""
NVLINK_LATENCY = 5e-6
"""Seconds per ring step inside a node: an order-of-magnitude figure for one NCCL hop over NVLink."""
INFINIBAND_BANDWIDTH = 8 * 400e9 / 8 / GPUS_PER_NODE
"""Bytes/s per GPU per direction between nodes: a DGX H100 node has 8 ConnectX-7 NDR ports of 400 Gb/s,
one per GPU, so 8 × 400 Gb/s = 400 GB/s per node = 50 GB/s per GPU."""
INFINIBAND_LATENCY = 15e-6
"""Seconds per ring step between nodes: an order-of-magnitude figure for one hop over NDR InfiniBand
(a switch traversal or two plus the NIC), the middle of the usual 10-20 µs."""
BUCKET_BYTES = 50e6 * 2
"""One reduce bucket: Loom's default `parallel.reduce_bucket_size` of 50 M elements, in bf16."""
BACKWARD_SHARE = 2 / 3
"""The backward pass is about 2/3 of a step's compute (twice the forward's FLOPs)."""
GRAD_BYTES_PER_PARAM = 2
"""Gradients and the gathered parameters travel in bf16."""


@dataclass(frozen=True)
class Link:
    """One level of the network as a ring sees it: bytes/s each rank sends (NCCL's 'bus bandwidth'),
    and the latency of one ring step."""

    bandwidth: float
    latency: float


NVLINK = Link(NVLINK_BANDWIDTH, NVLINK_LATENCY)
INFINIBAND = Link(INFINIBAND_BANDWIDTH, INFINIBAND_LATENCY)


def ring_all_reduce(nbytes: float, ranks: int, link: Link) -> float:
    """Seconds of a ring all-reduce of `nbytes` over `ranks`: 2(N-1) steps, each moving nbytes/N
    (a reduce-scatter then an all-gather): 2(N-1)/N · bytes / bandwidth + 2(N-1) · latency."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.latency


def ring_half(nbytes: float, ranks: int, link: Link) -> float:
    """A ring reduce-scatter or all-gather of `nbytes` (the whole tensor's size): half an all-reduce."""
    return ring_all_reduce(nbytes, ranks, link) / 2


@dataclass(frozen=True)
class Cluster:
    """GPUs, their achieved FLOP/s, and the two network levels. Defaults: the stated H100 cluster."""

    flops: float = H100_BF16_DENSE_FLOPS * ACHIEVED_MFU
    gpus_per_node: int = GPUS_PER_NODE
    intra: Link = NVLINK
    inter: Link = INFINIBAND
    name: str = f"H100 SXM, bf16 at {ACHIEVED_MFU:.0%} MFU, NVLink + 8×400 Gb/s InfiniBand per node"

    def all_reduce(self, nbytes: float, ranks: int) -> float:
        """Hierarchical all-reduce: reduce-scatter inside each node, all-reduce of each GPU's 1/g share
        with its peers on the other nodes (all g GPUs in parallel, each over its own NIC), all-gather
        inside the node. Within one node it is a plain NVLink ring."""
        g = min(ranks, self.gpus_per_node)
        nodes = math.ceil(ranks / self.gpus_per_node)
        inside = ring_all_reduce(nbytes, g, self.intra)  # = reduce-scatter + all-gather inside the node
        return inside + ring_all_reduce(nbytes / g, nodes, self.inter)

    def half(self, nbytes: float, ranks: int) -> float:
        """A hierarchical reduce-scatter or all-gather: half the all-reduce."""
        return self.all_reduce(nbytes, ranks) / 2


@dataclass(frozen=True)
class GptShape:
    """A GPT by its width, depth, vocabulary and sequence length; P = 12·L·d² + V·d (attention 4d², MLP
    8d² per layer, one tied embedding)."""

    name: str
    hidden: int
    layers: int
    vocab: int = 32000
    seq: int = 2048

    @property
    def params(self) -> float:
        return 12 * self.layers * self.hidden**2 + self.vocab * self.hidden

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6P (2 per weight forward, 4 backward) plus causal attention's score
        and value products, 6·L·seq·d (half of the full s×s, times 3 for backward)."""
        return 6 * self.params + 6 * self.layers * self.seq * self.hidden


GPT_1B = GptShape("1B", hidden=2048, layers=24)
GPT_7B = GptShape("7B", hidden=4096, layers=32)
SEQUENCES_PER_GPU = 1
"""Per-GPU batch of the extrapolation: 1 sequence of 2,048 tokens per GPU per step (at 1,024 GPUs a
2 M-token global batch, the usual size for these models, so more GPUs mean less work per GPU)."""


@dataclass(frozen=True)
class Step:
    """One step's time split: compute, communication, and the part of it not hidden behind compute."""

    compute: float
    comm: float
    exposed: float
    backlog: float = 0.0
    """With overlap: the communication that did not fit beside the compute meant to hide it (0 when the
    compute hides all of it but the last bucket)."""

    @property
    def seconds(self) -> float:
        return self.compute + self.exposed


@dataclass(frozen=True)
class Traffic:
    """A ZeRO stage's collectives per step, by when they can run: beside the forward, beside the backward,
    or only after the backward (the optimizer step in between)."""

    forward: float = 0.0
    backward: float = 0.0
    after: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.after


def zero_traffic(stage: int, params: float, ranks: int, cluster: Cluster) -> Traffic:
    """Seconds of communication per step. ZeRO-0/1: all-reduce of the bf16 gradients (2P bytes) during
    backward. ZeRO-2: reduce-scatter of the gradients during backward, all-gather of the updated bf16
    parameters after the optimizer step (together one all-reduce's volume). ZeRO-3: parameters gathered
    for the forward and again for the backward, gradients reduce-scattered; nothing after the step
    (parameters stay partitioned): 1.5× the volume of ZeRO-2, as in the ZeRO paper (3Ψ against 2Ψ)."""
    nbytes = GRAD_BYTES_PER_PARAM * params
    half = cluster.half(nbytes, ranks)
    if stage in (0, 1):
        return Traffic(backward=cluster.all_reduce(nbytes, ranks))
    if stage == 2:
        return Traffic(backward=half, after=half)
    if stage == 3:
        return Traffic(forward=half, backward=2 * half)
    raise ValueError(f"ZeRO stage {stage}: expected 0-3")


def state_bytes(stage: int, params: float, ranks: int) -> float:
    """Model state per GPU for mixed-precision Adam, as in the ZeRO paper: bf16 parameters (2P), bf16
    gradients (2P), and fp32 master weights + two moments (12P); ZeRO-1 partitions the 12P, ZeRO-2 also
    the gradients, ZeRO-3 also the parameters. Activations are not included."""
    partitioned = {0: 0, 1: 12, 2: 14, 3: 16}[stage] * params
    return 16 * params - partitioned + partitioned / ranks


def overlapped(comm: float, window: float, floor: float) -> float:
    """Seconds of `comm` left exposed when it runs beside `window` seconds of compute: the backlog the
    compute could not hide, but at least `floor` (the last bucket, which can only start once its
    compute has ended); never more than `comm` itself (overlap cannot make a step slower)."""
    return min(comm, max(comm - window, floor))


def step_time(
    model: GptShape,
    ranks: int,
    stage: int,
    overlap: bool,
    cluster: Cluster = Cluster(),
    sequences_per_gpu: int = SEQUENCES_PER_GPU,
    bucket_bytes: float = BUCKET_BYTES,
) -> Step:
    """One data-parallel step at `ranks` GPUs. Without overlap: compute + every collective. With
    overlap: the backward's collectives hide behind the backward (BACKWARD_SHARE of compute) down to
    the last bucket, ZeRO-3's forward gathers behind the forward (prefetch) down to the first layer's
    gather, and what runs after the backward stays exposed. Latency is paid once per collective, as
    if each phase were one fused call (bucketing would pay it once per bucket)."""
    compute = sequences_per_gpu * model.seq * model.flops_per_token / cluster.flops
    traffic = zero_traffic(stage, model.params, ranks, cluster)
    if not overlap:
        return Step(compute, traffic.total, traffic.total)
    nbytes = GRAD_BYTES_PER_PARAM * model.params
    last_bucket = cluster.all_reduce(min(bucket_bytes, nbytes), ranks)
    if stage == 3:  # each collective is a half: the bucket's reduce-scatter, the first layer's gather
        last_bucket = cluster.half(min(bucket_bytes, nbytes), ranks)
    first_gather = cluster.half(nbytes / model.layers, ranks) if traffic.forward else 0.0
    forward_window, backward_window = (1 - BACKWARD_SHARE) * compute, BACKWARD_SHARE * compute
    exposed = (
        overlapped(traffic.forward, forward_window, first_gather)
        + overlapped(traffic.backward, backward_window, last_bucket)
        + traffic.after
    )
    backlog = max(0.0, traffic.forward - forward_window) + max(0.0, traffic.backward - backward_window)
    return Step(compute, traffic.total, exposed, backlog)


def tokens_per_gpu(step: Step, model: GptShape, sequences_per_gpu: int = SEQUENCES_PER_GPU) -> float:
    return sequences_per_gpu * model.seq / step.seconds


def efficiency(step: Step, reference: Step) -> float:
    """Scaling efficiency: tokens/s per GPU at this N over tokens/s per GPU at the reference N (the same
    per-GPU batch, so the ratio of step times)."""
    return reference.seconds / step.seconds


@dataclass(frozen=True)
class MachinePoint:
    """This machine's measured figures at DP=2 (gloo, CPU) and the model's prediction from them."""

    compute: float
    """Seconds of one rank's share of the step on one process (its half of the global batch)."""
    all_reduce: float
    """Seconds of a gloo all-reduce of the step's gradient bytes between the 2 ranks."""
    latency: float
    """Seconds of a gloo all-reduce of one element between the 2 ranks (latency alone)."""
    grad_bytes: float
    measured_step: float
    """Seconds of the DP2 step (ZeRO-0, gradients all-reduced after the backward)."""
    link: Link = field(init=False)

    def __post_init__(self):
        # a 2-rank ring has 2 latency steps and sends the whole tensor once (2(N-1)/N = 1)
        alpha = self.latency / 2
        moving = max(self.all_reduce - self.latency, 1e-9)
        object.__setattr__(self, "link", Link(self.grad_bytes / moving, alpha))

    @property
    def predicted_step(self) -> float:
        """compute + ring all-reduce over the fitted gloo link, no overlap (Loom's ZeRO-0 reduces after
        the backward, and on a CPU nothing runs beside it)."""
        return self.compute + ring_all_reduce(self.grad_bytes, 2, self.link)
