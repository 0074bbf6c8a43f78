"""CLI wiring for `loom bench` (the benchmark library is `launch.bench`)."""

from __future__ import annotations

import argparse


def _sections(text: str) -> tuple:
    from loom.launch.bench.sections import SECTIONS

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def command_line(args: argparse.Namespace) -> str:
    """The options of this run as a `loom bench` command line."""
    parts = ["loom bench"]
    for flag in ("quick", "large"):
        if getattr(args, flag):
            parts.append(f"--{flag}")
    for name in ("rounds", "steps", "warmup", "threads", "corpus", "quiet_wait", "device", "time_limit"):
        value = getattr(args, name)
        if value is not None:
            parts.append(
                f"--{name.replace('_', '-')} {value:g}"
                if isinstance(value, float)
                else f"--{name.replace('_', '-')} {value}"
            )
    if args.sections:
        parts.append("--sections " + ",".join(args.sections))
    if args.dry_run:
        parts.append("--dry-run")
    return " ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from loom.launch.bench.options import BenchOptions
    from loom.launch.bench.run import run_bench
    from loom.launch.runtime.logs import progress_to_stderr

    sections, defaults = args.sections, {}
    if args.device == "cuda":
        import os

        import torch

        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asking must not initialise CUDA here
        if not args.dry_run and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device (--dry-run runs the gpu section on the CPU)")
        sections = sections or ("gpu",)
        from loom.launch.bench.section_gpu import header_options

        defaults = header_options(args.dry_run)
    elif args.dry_run:
        raise ValueError("--dry-run goes with --device cuda (it runs the gpu section's wiring on the CPU)")
    opts = BenchOptions.make(
        quick=args.quick,
        large=args.large,
        shape=defaults.get("shape"),
        rounds=args.rounds or defaults.get("rounds"),
        steps=args.steps or defaults.get("steps"),
        warmup=args.warmup if args.warmup is not None else defaults.get("warmup"),
        threads=args.threads,
        sections=sections,
        corpus=args.corpus,
        quiet_wait=args.quiet_wait,
        device=args.device,
        dry_run=args.dry_run or None,
        time_limit=args.time_limit,
    )
    progress_to_stderr("loom.launch.bench", quiet=args.silent)  # stdout carries the report alone
    report = run_bench(opts)
    text = report.text()
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- written by `{command_line(args)}` -->\n\n{text}")
    print(text, end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks against peers (HF Llama, megatron-core GPTModel) and the hardware limit",
        description="Measure Loom's training step against Hugging Face LlamaForCausalLM (sdpa) and "
        "megatron-core GPTModel at the same shape, the techniques' time and memory "
        "overhead, parallel layouts, ZeRO per-rank bytes and the data path, with the "
        "hardware ceiling probed in the same run. Configurations alternate round by "
        "round; medians and paired ratios are reported as a markdown table on stdout "
        "(progress on stderr).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny shape, 2 rounds: checks the harness in ~1-2 minutes")
    size.add_argument("--large", action="store_true", help="8 layers, d=1024, vocab 32000, seq 512 (slow on CPU)")
    p.add_argument("--rounds", type=_positive, default=None, help="alternating rounds (default 8; 2 with --quick)")
    p.add_argument("--steps", type=_positive, default=None, help="timed steps per configuration per round (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration first (default 2)")
    p.add_argument(
        "--threads", type=_positive, default=None, help="threads of single-process configurations (default 2)"
    )
    p.add_argument(
        "--sections",
        type=_sections,
        default=None,
        help="comma list of peers,techniques,layouts,interleaved,zero,sequence,data,generate,scaling,gpu "
        "(default: peers,techniques,layouts,zero,sequence,data; gpu with --device cuda; scaling, not by "
        "default: the DP2 step measured here and a model of it at 8-1,024 GPUs, ~1 minute)",
    )
    p.add_argument("--corpus", default=None, help="corpus of the data-path section (default linuxdoc)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each round wait up to this long for the rest of the machine to go idle (default 0)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="cuda: the gpu section (~1B Llama shape: Loom vs HF, technique overhead, MFU; docs/gpu.md)",
    )
    p.add_argument("--dry-run", action="store_true", help="with --device cuda: the gpu section on the CPU, tiny shape")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the gpu section skips configurations that would not fit in this many seconds",
    )
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)
