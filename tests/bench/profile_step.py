"""Where a training step's time goes: torch.profiler per-op self time of Loom's model next to HF
Llama (sdpa) and megatron-core GPTModel, same shape, one process (a script, not a test).

    .venv/bin/python tests/bench/profile_step.py [--shape default] [--threads 2] [--rounds 2] [--steps 2]
                                                 [--models loom,hf,megatron] [--by-shape] [--top 30]

Models are profiled in alternating rounds in this one process, and per-op times are summed over
rounds and divided by the steps, so a noisy spell on a shared machine spreads over all models.
`--by-shape` splits each op by its input shapes (find which tensor an elementwise op runs on).
This is how the hot spots fixed in model/attention.py, model/mlp.py, model/rope.py and
model/norm.py were found (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a plain script from anywhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="default", choices=["quick", "default", "large"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--models",
        default="loom,hf,megatron",
        help="comma list of loom, hf, megatron, loom+lcm, loom+scr, loom+cmr, loom+sca, loom+hcma, 'loom+all five'",
    )
    parser.add_argument("--by-shape", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29631"), RANK="0", WORLD_SIZE="1"
    )
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from loom.launch import bench

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=0, world_size=1)
    shape = bench.SHAPES[args.shape]
    techniques = bench.technique_configs(shape)
    builders = {"loom": bench.build_loom_plain, "hf": bench.build_hf_llama, "megatron": bench.build_megatron_gpt}
    for name, tech in techniques.items():  # "loom+lcm", ..., "loom+all five": Loom with techniques on
        if not name.startswith("baseline"):
            builders[f"loom+{name}"] = lambda r, w, s, tech=tech: bench.build_loom_plain(r, w, s, tech=tech)
    names = [n.strip() for n in args.models.split(",")]
    loops = {name: builders[name](0, 1, shape) for name in names}
    for loop in loops.values():
        loop.measure(1)  # allocations and optimizer state outside the profile

    per_op = collections.defaultdict(lambda: collections.defaultdict(float))
    steps = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, loop in loops.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
                steps[name] += loop.measure(args.steps)
            for event in prof.key_averages(group_by_input_shape=args.by_shape):
                key = event.key + (f" {event.input_shapes}" if args.by_shape else "")
                per_op[key][name] += event.self_cpu_time_total / 1000 / (args.rounds * args.steps)

    print(f"\n{shape.describe()}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| op | " + " | ".join(f"{n} ms/step" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    ranked = sorted(per_op, key=lambda k: -max(per_op[k].values()))
    for key in ranked[: args.top]:
        print(f"| `{key[:110]}` | " + " | ".join(f"{per_op[key].get(n, 0.0):.1f}" for n in names) + " |")
    print(
        "| **step (profiled, median)** | "
        + " | ".join(f"{sorted(steps[n])[len(steps[n]) // 2] * 1000:.0f}" for n in names)
        + " |"
    )


if __name__ == "__main__":
    main()
