"""`loom` — the command line. Each subcommand's work lives in its own module; this file only wires
arguments to it and turns bad input into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys

USAGE_ERROR = 2


def _cmd_config_show(args) -> int:
    from loom.launch.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides, world_size=args.world_size, check_files=False)
    print(to_yaml(cfg), end="")
    return 0


def _cmd_config_docs(args) -> int:
    from loom.launch.commands.config_docs import render_markdown
    from loom.launch.config import RunConfig

    text = render_markdown(RunConfig)
    if args.check:
        current = open(args.out).read() if os.path.exists(args.out) else ""
        if current != text:
            print(f"error: {args.out} is out of date; run `loom config docs`", file=sys.stderr)
            return 1
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


def _cmd_train(args) -> int:
    from loom.launch.train.run import train_from_cli

    overrides = list(args.overrides) + (["checkpoint.trust_pickles=true"] if args.trust_checkpoint else [])
    return train_from_cli(args.config, overrides, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="Distributed GPT pretraining with megatron-core TP, 1F1B pipelines, "
        "DeepSpeed ZeRO and the LCM/SCR/CMR/SCA/HCMA techniques.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (run under torchrun, deepspeed or srun for >1 process)")
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4")
    train.add_argument("--resume", default=None, help="none, auto, or a checkpoint directory")
    train.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="resume even if the checkpoint's pickles reference classes outside Loom's allowlist "
        "(loading a pickle can run code: only for checkpoints you trust)",
    )
    train.set_defaults(func=_cmd_train)

    config = sub.add_parser("config", help="inspect configurations")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the resolved config (defaults ← YAML ← overrides)")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--world-size", type=int, default=None, help="also check the layout against this many ranks")
    show.set_defaults(func=_cmd_config_show)
    docs = config_sub.add_parser("docs", help="write the config reference (docs/config.md)")
    docs.add_argument("--out", default="docs/config.md")
    docs.add_argument("--check", action="store_true", help="fail if the file is out of date")
    docs.set_defaults(func=_cmd_config_docs)

    from loom.launch.commands import bench as cmd_bench
    from loom.launch.commands import convert as cmd_convert
    from loom.launch.commands import data as cmd_data
    from loom.launch.commands import eval as cmd_eval
    from loom.launch.commands import generate as cmd_generate
    from loom.launch.commands import study as cmd_study

    for commands in (cmd_data, cmd_convert, cmd_eval, cmd_study, cmd_bench, cmd_generate):
        commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from loom.launch.runtime.logs import setup_logging
    from loom.launch.runtime.warning_filters import filter_known_warnings

    filter_known_warnings()
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
    from loom.data.shard_reader import CorruptShardError
    from loom.launch.checkpoint.errors import CheckpointError
    from loom.launch.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return USAGE_ERROR
    except (
        ValueError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        CheckpointError,
        CorruptShardError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
