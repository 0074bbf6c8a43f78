"""CLI wiring for `loom generate` (`launch.generate`)."""

from __future__ import annotations

import argparse
import logging
import warnings


def _cmd_generate(args: argparse.Namespace) -> int:
    from loom.launch.generate.run import GenerateRequest, generate_from_cli, read_prompts
    from loom.launch.generate.sampling import Sampling

    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    request = GenerateRequest(
        model=args.model,
        prompts=read_prompts(args.prompt, args.prompts_file),
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
        stop_at_eos=not args.ignore_eos,
        context=args.context,
        use_cache=not args.no_cache,
        tokenizer=args.tokenizer,
        precision=args.precision,
        trust_pickles=args.trust_checkpoint,
    )
    result = generate_from_cli(request)
    for index, (prompt, text) in enumerate(zip(request.prompts, result.texts), start=1):
        if len(request.prompts) > 1:
            print(f"--- {index}/{len(request.prompts)} ---")
        print(f"{prompt}{text}")
    d = result.decoded
    print(
        f"{d.new_tokens:,} new tokens in {d.seconds:.2f} s: {d.tokens_per_s:,.1f} tokens/s "
        f"({'KV cache' if request.use_cache else 'no cache'}, batch {len(request.prompts)}, "
        f"{'greedy' if request.sampling.greedy else f'sampled, seed {request.sampling.seed}'})"
    )
    return 0


def add_commands(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="continue text prompts with a checkpoint, consolidated folder or exported Hugging Face folder",
        description="Greedy or sampled continuation of one or more prompts (one left-padded batch) in one "
        "process, with the KV cache and the techniques' inference state. Any checkpoint layout is consolidated "
        "into one TP=1 model through the checkpoint reader; a `loom convert to-hf` folder is read from its "
        "config.json and safetensors only.",
    )
    gen.add_argument("model", help="checkpoint folder, run directory, consolidated folder or Hugging Face folder")
    gen.add_argument("--prompt", action="append", default=[], help="text to continue (repeat for a batch)")
    gen.add_argument("--prompts-file", default=None, help="one prompt per line (\\n in a line is a newline)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    gen.add_argument(
        "--context",
        type=int,
        default=None,
        help="positions the model sees at most, a sliding window past it (default: its training length)",
    )
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    gen.add_argument("--tokenizer", default=None, help="SentencePiece model, if the folder has none")
    gen.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16")
    gen.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read the checkpoint's pickles even if they reference classes outside Loom's allowlist "
        "(loading a pickle can run code: only for checkpoints you trust)",
    )
    gen.set_defaults(func=_cmd_generate)
