"""Before/after of the speed changes in Loom's model code (a script, not a test).

    .venv/bin/python tests/bench/ab_model_code.py [--shape default] [--threads 2] [--rounds 8] [--steps 2]

The "before" forwards are the implementations these files had before the performance work
(issue 11), kept here verbatim; the "after" ones are whatever model/ holds now. The script
1. checks numerics: loss and every parameter gradient of one GPTStage under both, fp32 and bf16,
   with and without grouped-query attention;
2. times the whole training step (the peers' loop: forward, backward, clip, fused AdamW) with the
   before and after code swapped in alternately in this one process, and prints the paired median
   ratio after/before, plus per-component ratios (attention, SwiGLU, RMSNorm forward+backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a plain script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ------------------------------------------------------------------- the "before" implementations
def before_apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def before_attention_forward(self, x, cos, sin):
    s, b, _ = x.shape
    qkv, _ = self.qkv(x)
    qkv = qkv.view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
    q = qkv[:, :, :, : self.q_per_group].reshape(s, b, -1, self.head_dim)
    k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
    q, k = before_apply_rotary(q, cos, sin), before_apply_rotary(k, cos, sin)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_per_group > 1)
    out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
    y, _ = self.proj(out)
    return y


def before_swiglu_forward(self, x):
    gate_up, _ = self.gate_up(x)
    gate, up = gate_up.unflatten(-1, (-1, 2)).unbind(-1)
    y, _ = self.down(F.silu(gate) * up)
    return y


def before_rmsnorm_forward(self, x):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


class Swap:
    """Install the before or the after forwards on the model classes."""

    def __init__(self):
        from loom.model.attention import Attention
        from loom.model.mlp import SwiGLU
        from loom.model.norm import RMSNorm

        self.classes = (Attention, SwiGLU, RMSNorm)
        self.after = tuple(c.forward for c in self.classes)
        self.before = (before_attention_forward, before_swiglu_forward, before_rmsnorm_forward)

    def use(self, which: str) -> None:
        for cls, fn in zip(self.classes, self.before if which == "before" else self.after):
            cls.forward = fn


def numerics(shape, swap) -> list[str]:
    from loom.launch import bench
    from loom.model.parallel.parallelize import build_stage
    from loom.techniques.config import TechniquesConfig

    layout = bench.init_grid()
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        for kv in (shape.heads, max(1, shape.heads // 4)):
            cfg = bench.model_config(shape)
            cfg.num_kv_heads = kv
            module = build_stage(cfg, TechniquesConfig(), layout, 0, dtype)
            tokens = bench.token_batch(shape, 2)
            got = {}
            for which in ("before", "after"):
                swap.use(which)
                module.zero_grad(set_to_none=True)
                loss = module(tokens)
                loss.backward()
                got[which] = (loss.detach().float(), {n: p.grad.float().clone() for n, p in module.named_parameters()})
            swap.use("after")
            loss_diff = (got["before"][0] - got["after"][0]).abs().item()
            rel = max(
                (
                    (got["before"][1][n] - got["after"][1][n]).abs().max() / (got["before"][1][n].abs().max() + 1e-30)
                ).item()
                for n in got["before"][1]
            )
            lines.append(
                f"| {str(dtype).replace('torch.', '')} | {shape.heads} q / {kv} kv heads | "
                f"{loss_diff:.3g} | {rel:.3g} |"
            )
    return lines


def component_times(shape, swap, rounds: int) -> dict[str, float]:
    from loom.launch import bench
    from loom.model.attention import Attention
    from loom.model.mlp import SwiGLU
    from loom.model.norm import RMSNorm
    from loom.model.parallel.groups import megatron_layer_config
    from loom.model.rope import RotaryEmbedding

    cfg = bench.model_config(shape)
    lc = megatron_layer_config(torch.float32)
    torch.manual_seed(0)
    parts = {"attention": Attention(cfg, lc, 1), "swiglu": SwiGLU(cfg, lc), "rmsnorm": RMSNorm(cfg.hidden_size)}
    for module in parts.values():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).cos_sin(shape.seq, torch.device("cpu"), torch.float32)
    x0 = torch.randn(shape.seq, shape.batch, cfg.hidden_size)

    def run(name):
        module = parts[name]
        x = x0.clone().requires_grad_(True)
        y = module(x, cos, sin) if name == "attention" else module(x)
        y.sum().backward()

    ratios = {}
    for name in parts:
        times = {"before": [], "after": []}
        for _ in range(rounds):
            for which in ("before", "after"):
                swap.use(which)
                start = time.perf_counter()
                for _ in range(3):
                    run(name)
                times[which].append(time.perf_counter() - start)
        swap.use("after")
        ratios[name] = statistics.median(a / b for a, b in zip(times["after"], times["before"]))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="default", choices=["quick", "default", "large"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, help="wait up to this long for an idle machine per round"
    )
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29632"), RANK="0", WORLD_SIZE="1"
    )
    import torch.distributed as dist

    from loom.launch import bench

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=0, world_size=1)
    shape = bench.SHAPES[args.shape]
    swap = Swap()

    print(f"\n{shape.describe()}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| dtype | heads | loss |before − after| | max relative gradient difference |\n|---|---|---|---|")
    print("\n".join(numerics(shape, swap)))

    loop = bench.build_loom_plain(0, 1, shape)
    loop.measure(1)
    meter = bench.CpuMeter()
    times = {"before": [], "after": []}
    quiet = []
    for _ in range(args.rounds):
        if args.quiet_wait:
            meter.wait_for_quiet(args.quiet_wait)
        others = []
        for which in ("before", "after"):
            swap.use(which)
            token = meter.start([])
            times[which].append(statistics.median(loop.measure(args.steps)))
            others.append(meter.stop(token))
        quiet.append(max(others) < bench.QUIET_CORES)
    swap.use("after")
    pairs = list(zip(times["after"], times["before"]))
    step_ratio = statistics.median(a / b for a, b in pairs)
    quiet_pairs = [p for p, q in zip(pairs, quiet) if q]
    quiet_ratio = f"{statistics.median(a / b for a, b in quiet_pairs):.3f}" if quiet_pairs else "–"
    parts = component_times(shape, swap, args.rounds)
    print(
        f"\n| measured | before | after | after / before, paired median of {args.rounds} rounds | "
        f"same, quiet rounds only |\n|---|---|---|---|---|"
    )
    print(
        f"| training step (median) | {statistics.median(times['before']) * 1000:.0f} ms | "
        f"{statistics.median(times['after']) * 1000:.0f} ms | {step_ratio:.3f} | "
        f"{quiet_ratio} ({len(quiet_pairs)}) |"
    )
    print(
        f"| training step (best) | {min(times['before']) * 1000:.0f} ms | {min(times['after']) * 1000:.0f} ms | "
        f"{min(times['after']) / min(times['before']):.3f} (best ÷ best) | |"
    )
    for name, ratio in parts.items():
        print(f"| {name} forward+backward | | | {ratio:.3f} | |")


if __name__ == "__main__":
    main()
