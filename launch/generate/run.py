"""`loom generate`: continue text prompts with a checkpoint, a consolidated folder or an exported Hugging
Face folder, in one process (the model is consolidated into a TP=1, PP=1 stage), with the KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loom.launch.generate.decode import Decoded, StageRunner, decode
from loom.launch.generate.sampling import Sampling, sampler

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    """One `loom generate` invocation."""

    model: str
    """Checkpoint folder, run directory, consolidated folder or `loom convert to-hf` folder."""
    prompts: list[str]
    """Texts to continue (one batch, left-padded)."""
    max_new_tokens: int = 64
    """New tokens per prompt at most."""
    sampling: Sampling = field(default_factory=Sampling)
    """Greedy or sampled decoding."""
    stop_at_eos: bool = True
    """Stop a prompt's continuation at the end-of-document token."""
    context: Optional[int] = None
    """Positions the model sees at most (a sliding window past it); None: the model's training length."""
    use_cache: bool = True
    """Decode with the KV cache (False: recompute the whole sequence every step)."""
    tokenizer: Optional[str] = None
    """SentencePiece model, when the folder has none."""
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32), fp32 or bf16."""
    trust_pickles: bool = False
    """Read checkpoint pickles outside Loom's allowlist (only for checkpoints you trust)."""


@dataclass
class GenerateResult:
    texts: list[str]
    """Each prompt's continuation."""
    decoded: Decoded


def read_prompts(prompts: list[str], prompts_file: Optional[str]) -> list[str]:
    """The --prompt texts, then one prompt per non-empty line of --prompts-file (`\\n` escapes a newline)."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {prompts_file}: no such file")
        out += [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError("give a prompt: --prompt TEXT or --prompts-file FILE")
    return out


def check_request(req: GenerateRequest) -> None:
    """Every problem of the request before any model loads (one `error:` line each)."""
    from loom.launch.config import ConfigError

    problems = req.sampling.problems()
    if req.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {req.max_new_tokens}")
    if req.context is not None and req.context < 1:
        problems.append(f"--context must be >= 1, got {req.context}")
    if req.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"--precision must be auto, fp32 or bf16, got {req.precision!r}")
    if not Path(req.model).exists():
        problems.append(f"{req.model}: no such checkpoint or model folder")
    if req.tokenizer is not None and not Path(req.tokenizer).is_file():
        problems.append(f"--tokenizer {req.tokenizer}: no such file")
    if problems:
        raise ConfigError(problems)


def generate(req: GenerateRequest, layout) -> GenerateResult:
    """Load, tokenize, decode (megatron's TP=1 grid must be up on a one-process world)."""
    from loom.data.tokenizer import Tokenizer
    from loom.launch.generate.load import load_model
    from loom.model.parallel.parallelize import default_device, resolve_dtype

    device = default_device()
    loaded = load_model(req.model, layout, req.trust_pickles, resolve_dtype(req.precision), device)
    tokenizer_path = req.tokenizer or loaded.tokenizer
    if tokenizer_path is None:
        raise ValueError(f"{req.model} has no tokenizer.model: pass --tokenizer PATH")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != loaded.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, the model {loaded.model.vocab_size}")
    ids = [tokenizer.encode(text) for text in req.prompts]
    if any(not row for row in ids):
        raise ValueError("a prompt encodes to no tokens")
    log.info(f"generate: {loaded.description} · {len(ids)} prompt(s) · {req.max_new_tokens} new tokens at most")
    runner = StageRunner(loaded.stage, sampler(req.sampling, loaded.model.vocab_size, device))
    decoded = decode(
        runner,
        ids,
        req.max_new_tokens,
        eos_id=loaded.model.eos_id if req.stop_at_eos else None,
        context=req.context or loaded.model.seq_length,
        use_cache=req.use_cache,
    )
    return GenerateResult([tokenizer.decode(row) for row in decoded.ids], decoded)


def generate_from_cli(req: GenerateRequest) -> GenerateResult:
    """`generate` in this process's own one-rank world (refused under a multi-process launcher)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from loom.launch.runtime.env import init_distributed, read_dist_env
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.groups import init_parallel_groups

    check_request(req)
    denv = read_dist_env()
    if denv.world_size != 1:
        raise ValueError(f"loom generate runs in one process (the launcher started {denv.world_size})")
    init_distributed(denv, 600.0)
    try:
        cpu_compat.apply()
        layout = init_parallel_groups(ParallelConfig(tensor=1, pipeline=1))
        return generate(req, layout)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
