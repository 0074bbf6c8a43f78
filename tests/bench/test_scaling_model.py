"""The scaling section's analytic model (launch/bench/scaling_model.py): known answers of the collective
formulas, and the properties its table relies on (pure Python, no workers)."""

import pytest

from loom.launch.bench.scaling_model import (
    GPT_1B,
    GPT_7B,
    Cluster,
    GptShape,
    Link,
    MachinePoint,
    Step,
    efficiency,
    overlapped,
    ring_all_reduce,
    ring_half,
    state_bytes,
    step_time,
    zero_traffic,
)
from loom.launch.bench.scaling_table import CONFIGS, GPU_COUNTS, MODELS, scaling_findings, scaling_grid

GB = 1e9
NO_LATENCY = Link(bandwidth=10 * GB, latency=0.0)


def test_ring_all_reduce_at_two_ranks_sends_the_tensor_once():
    assert ring_all_reduce(5 * GB, 2, NO_LATENCY) == pytest.approx(0.5)


def test_ring_all_reduce_bandwidth_term_tends_to_twice_the_bytes():
    # 2(N-1)/N · B / bw: 1.75 B/bw at 8 ranks
    assert ring_all_reduce(10 * GB, 8, NO_LATENCY) == pytest.approx(1.75)


def test_ring_all_reduce_latency_is_two_steps_per_extra_rank():
    assert ring_all_reduce(0.0, 4, Link(bandwidth=GB, latency=1e-5)) == pytest.approx(6e-5)


def test_one_rank_communicates_nothing():
    assert ring_all_reduce(GB, 1, NO_LATENCY) == 0.0
    assert Cluster().all_reduce(GB, 1) == 0.0


def test_reduce_scatter_and_all_gather_are_half_an_all_reduce():
    link = Link(bandwidth=3 * GB, latency=2e-5)
    assert 2 * ring_half(7 * GB, 16, link) == pytest.approx(ring_all_reduce(7 * GB, 16, link))


def test_inside_one_node_the_cluster_is_a_plain_nvlink_ring():
    cluster = Cluster()
    assert cluster.all_reduce(4 * GB, 8) == pytest.approx(ring_all_reduce(4 * GB, 8, cluster.intra))


def test_across_nodes_each_gpu_all_reduces_its_share_over_infiniband():
    # 16 GPUs: an NVLink ring of 8 per node, then 2 nodes all-reduce 1/8 of the bytes each way
    cluster = Cluster(intra=NO_LATENCY, inter=Link(bandwidth=GB, latency=0.0))
    expected = 2 * 7 / 8 * 8 * GB / (10 * GB) + 2 * 1 / 2 * GB / GB
    assert cluster.all_reduce(8 * GB, 16) == pytest.approx(expected)


def test_zero_traffic_volumes():
    cluster, params, n = Cluster(), 1e9, 64
    all_reduce = cluster.all_reduce(2 * params, n)
    assert zero_traffic(0, params, n, cluster).total == pytest.approx(all_reduce)
    assert zero_traffic(1, params, n, cluster).total == pytest.approx(all_reduce)
    assert zero_traffic(2, params, n, cluster).total == pytest.approx(all_reduce)
    assert zero_traffic(3, params, n, cluster).total == pytest.approx(1.5 * all_reduce)
    with pytest.raises(ValueError):
        zero_traffic(4, params, n, cluster)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", GPU_COUNTS)
def test_zero3_never_communicates_less_than_zero1(model, n):
    assert step_time(model, n, 3, False).comm >= step_time(model, n, 1, False).comm


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", (2, *GPU_COUNTS))
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_overlap_never_makes_a_step_slower(model, n, stage):
    for cluster in (Cluster(), Cluster(inter=Link(bandwidth=1e9, latency=1e-3))):  # also comm-bound
        with_overlap = step_time(model, n, stage, True, cluster)
        without = step_time(model, n, stage, False, cluster)
        assert with_overlap.seconds <= without.seconds
        assert with_overlap.compute == without.compute and with_overlap.comm == without.comm


def test_overlapped_hides_down_to_the_floor_and_no_further():
    assert overlapped(comm=1.0, window=5.0, floor=0.1) == pytest.approx(0.1)  # hidden but the last bucket
    assert overlapped(comm=3.0, window=1.0, floor=0.1) == pytest.approx(2.0)  # the backlog stays exposed
    assert overlapped(comm=0.05, window=5.0, floor=0.1) == pytest.approx(0.05)  # never more than the comm


def test_without_overlap_the_step_is_compute_plus_every_collective():
    step = step_time(GPT_1B, 64, 3, False)
    assert step.seconds == pytest.approx(step.compute + step.comm)


def test_compute_is_tokens_times_flops_over_achieved_rate():
    cluster = Cluster(flops=1e15)
    step = step_time(GPT_7B, 8, 1, False, cluster, sequences_per_gpu=2)
    assert step.compute == pytest.approx(2 * GPT_7B.seq * GPT_7B.flops_per_token / 1e15)


def test_gpt_shapes_have_the_usual_parameter_counts():
    assert GptShape("t", hidden=10, layers=2, vocab=7).params == 12 * 2 * 100 + 70
    assert GPT_1B.params == pytest.approx(1.27e9, rel=0.01)
    assert GPT_7B.params == pytest.approx(6.57e9, rel=0.01)


def test_efficiency_is_one_at_the_reference_and_falls_with_more_communication():
    grid = scaling_grid()
    for model in MODELS:
        for stage, overlap in CONFIGS:
            assert grid[model.name, GPU_COUNTS[0], stage, overlap].efficiency == pytest.approx(1.0)
            assert grid[model.name, GPU_COUNTS[-1], stage, overlap].efficiency < 1.0
    assert efficiency(Step(1.0, 1.0, 1.0), Step(1.0, 1.0, 0.0)) == pytest.approx(0.5)


def test_state_bytes_follow_the_zero_paper():
    params, n = 1e9, 8
    assert state_bytes(0, params, n) == pytest.approx(16 * params)
    assert state_bytes(1, params, n) == pytest.approx(4 * params + 12 * params / n)
    assert state_bytes(2, params, n) == pytest.approx(2 * params + 14 * params / n)
    assert state_bytes(3, params, n) == pytest.approx(16 * params / n)


def test_machine_point_fits_its_link_to_the_measured_all_reduce():
    point = MachinePoint(compute=1.0, all_reduce=0.11, latency=0.01, grad_bytes=1e8, measured_step=1.2)
    assert point.link.latency == pytest.approx(0.005)
    assert point.link.bandwidth == pytest.approx(1e9)
    assert point.predicted_step == pytest.approx(1.11)  # the fit reproduces the all-reduce it came from


def test_findings_are_read_off_the_numbers():
    grid = scaling_grid()
    text = "\n".join(scaling_findings(grid))
    top = grid["7B", GPU_COUNTS[-1], 1, False]
    assert f"{top.efficiency:.0%} (ZeRO-1)" in text
    slow = scaling_grid(Cluster(inter=Link(bandwidth=1e9, latency=1e-4)))  # a 1 GB/s network: comm-bound
    assert "outgrows the compute" in "\n".join(scaling_findings(slow))
    assert "outgrows the compute" not in text.split("**7B**")[1]  # the stated cluster hides 7B's traffic
