"""CLI wiring for `loom eval` (launch.evaluate) and `loom study` (launch.study)."""

from __future__ import annotations

import argparse


def _cmd_eval(args: argparse.Namespace) -> int:
    from loom.launch.eval.evaluate import eval_from_cli

    return eval_from_cli(args)


def _cmd_study(args: argparse.Namespace) -> int:
    from loom.launch.study.plan import study_from_cli

    return study_from_cli(args.config, args.overrides, report_only=args.report_only)


def add_commands(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: held-out loss/perplexity and the techniques' metrics",
        description="Held-out loss and every evaluation metric of TECHNIQUES.md on a checkpoint; results as "
        "JSON and TensorBoard scalars. Run as one process for TP=PP=1, or under torchrun with a "
        "multiple of the checkpoint's TP×PP processes (the extra factor is data parallelism). Any "
        "ZeRO stage: a ZeRO-3 checkpoint is consolidated into full weights on the fly.",
    )
    ev.add_argument("checkpoint", nargs="?", help="checkpoint folder (…/checkpoints/step_N) or a run directory")
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
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="evaluation sizes and knobs, e.g. gen_tokens=512 kv_samples=500 "
        "(see EvalSettings in launch/eval_settings.py)",
    )
    ev.add_argument("--list", action="store_true", help="list the metric families and exit")
    ev.set_defaults(func=_cmd_eval)

    st = sub.add_parser(
        "study",
        help="train and evaluate the baseline, each technique and all five over several seeds",
        description="Trains every arm of the study config (baseline, each technique alone, all five) on the same "
        "data, tokens and seeds, evaluates every run, and writes report.md with mean ± std, Welch "
        "t-tests against the baseline and PNG plots. Finished runs and evaluations are skipped, so an "
        "interrupted study resumes.",
    )
    st.add_argument("config", help="study config, e.g. configs/study.yaml")
    st.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[1,2,3] run.train.max_steps=100")
    st.add_argument("--report-only", action="store_true", help="only rebuild report.md and the plots")
    st.set_defaults(func=_cmd_study)
