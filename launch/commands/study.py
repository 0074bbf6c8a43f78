"""CLI wiring for `loom study` (`launch.study`)."""

from __future__ import annotations

import argparse


def _cmd_study(args: argparse.Namespace) -> int:
    from loom.launch.study.execute import study_from_cli

    return study_from_cli(args.config, args.overrides, report_only=args.report_only)


def add_commands(sub) -> None:
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
