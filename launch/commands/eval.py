"""CLI wiring for `loom eval` (`launch.eval.evaluate`)."""

from __future__ import annotations

import argparse


def _cmd_eval(args: argparse.Namespace) -> int:
    from loom.launch.eval.evaluate import eval_from_cli

    return eval_from_cli(args)


def add_commands(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: held-out loss/perplexity and the techniques' metrics",
        description="Held-out loss and every evaluation metric of docs/techniques.md on a checkpoint; results as "
        "JSON and TensorBoard scalars. Run as one process for TP=PP=1, or under torchrun with a "
        "multiple of the checkpoint's TP×PP processes (the extra factor is data parallelism). Any "
        "ZeRO stage: a ZeRO-3 checkpoint is consolidated into full weights on the fly; a consolidated folder "
        "works too.",
    )
    ev.add_argument(
        "checkpoint", nargs="?", help="checkpoint folder (…/checkpoints/step_N), run directory or consolidated folder"
    )
    ev.add_argument(
        "--data",
        default=None,
        help="held-out data: a shard manifest (or its folder; the val split when present), a built-in "
        "corpus name, or text files; default: the run's eval data",
    )
    ev.add_argument("--metrics", default="all", help="comma-separated metric families (see --list); default all")
    ev.add_argument("--out", default=None, help="results JSON (default <run>/eval/eval_step_N.json)")
    ev.add_argument("--tb", default=None, help="TensorBoard directory (default <run>/tensorboard)")
    ev.add_argument(
        "--train-data",
        default=None,
        help="training shard manifest for the frequency buckets (default: the run's training data)",
    )
    ev.add_argument(
        "--profile",
        default="spec",
        choices=["spec", "quick"],
        help="evaluation sizes: spec (the sizes docs/techniques.md's metrics ask for: hours on a CPU; default) or "
        "quick (a small model in about a minute on a CPU); --set overrides single knobs on top",
    )
    ev.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="evaluation sizes and knobs on top of the profile, e.g. gen_tokens=128 kv_samples=50 "
        "reference=CKPT (the kNN overlap's reference table; see EvalSettings in launch/eval/settings.py)",
    )
    ev.add_argument("--list", action="store_true", help="list the metric families and exit")
    ev.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read the checkpoint's pickles even if they reference classes outside Loom's allowlist "
        "(loading a pickle can run code: only for checkpoints you trust)",
    )
    ev.set_defaults(func=_cmd_eval)
