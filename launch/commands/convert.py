"""CLI wiring for `loom convert {consolidate,to-hf,from-hf,reshard}`.

Handlers return an exit code; a bad input raises `ConvertError` (a ValueError) with one line that
the CLI's main prints as `error: …` (exit 2), never a library traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings

TRUST_HELP = (
    "load the checkpoint's pickles even if they reference classes outside Loom's allowlist (loading a pickle "
    "can run code: only for checkpoints you trust)"
)


def _quiet():
    """Library chatter (DeepSpeed's accelerator line, transformers' notices) off the console."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("DeepSpeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _errors():
    """Turn unexpected library failures on user input into one line."""
    from loom.launch.checkpoint.errors import ConvertError

    try:
        yield
    except ConvertError:
        raise
    except (OSError, RuntimeError, KeyError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConvertError(f"{type(exc).__name__}: {text}") from None


def cmd_consolidate(args) -> int:
    _quiet()
    from loom.launch.convert.consolidate import consolidate

    with _errors():
        consolidate(
            args.checkpoint, args.out, optimizer=args.optimizer, force=args.force, trust_pickles=args.trust_checkpoint
        )
    return 0


def cmd_align_embeddings(args) -> int:
    _quiet()
    from loom.launch.convert.align_embeddings import align_embeddings

    with _errors():
        align_embeddings(args.checkpoint, args.out, force=args.force, trust_pickles=args.trust_checkpoint)
    return 0


def cmd_to_hf(args) -> int:
    _quiet()
    from loom.launch.convert.hf_export import to_hf

    with _errors():
        to_hf(
            args.checkpoint,
            args.out,
            remote_code=args.remote_code,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            skip_tokenizer=args.skip_tokenizer,
            force=args.force,
            trust_pickles=args.trust_checkpoint,
        )
    return 0


def cmd_from_hf(args) -> int:
    _quiet()
    from loom.launch.convert.hf_import import from_hf

    with _errors():
        from_hf(args.hf_dir, args.out, tokenizer=args.tokenizer, force=args.force)
    return 0


def cmd_reshard(args) -> int:
    _quiet()
    from loom.launch.convert.reshard import reshard

    with _errors():
        reshard(
            args.checkpoint,
            args.out,
            tensor=args.tensor,
            pipeline=args.pipeline,
            zero=args.zero,
            virtual_stages=args.virtual_stages,
            data_parallel=args.data,
            optimizer=not args.no_optimizer,
            force=args.force,
            trust_pickles=args.trust_checkpoint,
        )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert` and its actions to the CLI's subparsers."""
    convert = subparsers.add_parser(
        "convert",
        help="convert checkpoints (Hugging Face, consolidated weights, other layouts)",
        description="CKPT is a checkpoint folder (<run>/checkpoints/step_N), a run directory (its newest complete "
        "checkpoint) or a consolidated folder written by this command.",
    )
    sub = convert.add_subparsers(
        dest="convert_command", metavar="{consolidate,to-hf,from-hf,reshard,align-embeddings}", required=True
    )

    def common(p, source_help="checkpoint folder, run directory or consolidated folder"):
        p.add_argument("checkpoint", metavar="CKPT", help=source_help)
        p.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty)")
        p.add_argument("--force", action="store_true", help="replace OUT if it exists")
        p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)

    cons = sub.add_parser("consolidate", help="full fp32 weights (one safetensors file + JSON) from any layout")
    common(cons)
    cons.add_argument("--optimizer", action="store_true", help="also write Adam's state (optimizer.safetensors)")
    cons.set_defaults(func=cmd_consolidate)

    align = sub.add_parser(
        "align-embeddings",
        help="HCMA offline mode: align the input embedding table of a "
        "checkpoint (a start point for training or export)",
    )
    common(align)
    align.set_defaults(func=cmd_align_embeddings)

    hf = sub.add_parser("to-hf", help="Hugging Face LlamaForCausalLM folder (or Loom remote code with --remote-code)")
    common(hf)
    hf.add_argument(
        "--remote-code",
        action="store_true",
        help="export Loom's own modeling code (needed when LCM, SCR or CMR are trained)",
    )
    hf.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    hf.add_argument(
        "--tokenizer",
        metavar="MODEL",
        default=None,
        help="SentencePiece .model to export instead of the checkpoint's tokenizer.model",
    )
    hf.add_argument("--skip-tokenizer", action="store_true", help="export the model without a tokenizer")
    hf.set_defaults(func=cmd_to_hf)

    fhf = sub.add_parser("from-hf", help="Llama-architecture Hugging Face folder → Loom start point + config.yaml")
    fhf.add_argument("hf_dir", metavar="HF_DIR", help="local folder with config.json and model.safetensors")
    fhf.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty)")
    fhf.add_argument(
        "--tokenizer",
        metavar="MODEL",
        default=None,
        help="SentencePiece .model (default: HF_DIR/tokenizer.model if present)",
    )
    fhf.add_argument("--force", action="store_true", help="replace OUT if it exists")
    fhf.set_defaults(func=cmd_from_hf)

    rs = sub.add_parser("reshard", help="start point for another TP×PP×DP×ZeRO layout, optimizer state included")
    common(rs)
    rs.add_argument(
        "--tensor", type=int, default=None, help="target parallel.tensor (validated, written to config.yaml)"
    )
    rs.add_argument("--pipeline", type=int, default=None, help="target parallel.pipeline")
    rs.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3], help="target parallel.zero_stage")
    rs.add_argument("--virtual-stages", type=int, default=None, help="target parallel.virtual_stages")
    rs.add_argument("--data", type=int, default=None, help="target data-parallel size (only validated)")
    rs.add_argument("--no-optimizer", action="store_true", help="weights only: Adam's state restarts")
    rs.set_defaults(func=cmd_reshard)
