"""CLI wiring for `loom bench` (the benchmark library is `launch.bench`)."""

from __future__ import annotations

import argparse
import sys


def _sections(text: str) -> tuple:
    from loom.launch.bench import SECTIONS

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
    for name in ("rounds", "steps", "warmup", "threads", "corpus", "quiet_wait"):
        value = getattr(args, name)
        if value is not None:
            parts.append(
                f"--{name.replace('_', '-')} {value:g}"
                if isinstance(value, float)
                else f"--{name.replace('_', '-')} {value}"
            )
    if args.sections:
        parts.append("--sections " + ",".join(args.sections))
    return " ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from loom.launch.bench import BenchOptions, run_bench

    opts = BenchOptions.make(
        quick=args.quick,
        large=args.large,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        sections=args.sections,
        corpus=args.corpus,
        quiet_wait=args.quiet_wait,
    )
    log = (lambda line: None) if args.silent else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_bench(opts, log=log)
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
        help="comma list of peers,techniques,layouts,zero,data (default: all)",
    )
    p.add_argument("--corpus", default=None, help="corpus of the data-path section (default linuxdoc)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each round wait up to this long for the rest of the machine to go idle (default 0)",
    )
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)
