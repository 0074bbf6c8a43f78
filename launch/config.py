"""The run configuration: documented dataclasses, loaded from YAML with dotted overrides.

OmegaConf structured configs do the typing and merging; Loom adds one clear message per problem
(unknown keys with a did-you-mean, wrong types, layout and shape constraints) before any process
group starts.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loom.data.config import DataConfig
from loom.model.config import ModelConfig
from loom.model.parallel.config import ParallelConfig
from loom.model.parallel.optim import OptimConfig
from loom.techniques.config import TechniquesConfig


class ConfigError(ValueError):
    """One or more problems in a run configuration; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Samples per micro-batch on each data-parallel rank."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    seed: int = 1234
    """Seed for weights, data order and every other random choice."""
    precision: str = "auto"
    """fp32, bf16, or auto (bf16 on GPUs that have it, fp32 on CPU)."""
    log_every: int = 10
    """Steps between console lines and TensorBoard scalars."""
    eval_every: int = 200
    """Steps between held-out evaluations; 0 disables periodic evaluation."""
    max_minutes: float = 0.0
    """Stop with a checkpoint after this many minutes of training; 0 means no limit."""
    max_consecutive_nonfinite: int = 5
    """Stop with a checkpoint after this many consecutive steps with a non-finite loss or gradient."""
    mfu_peak_tflops: float = 0.0
    """Peak TFLOP/s per rank for MFU; 0 measures a matmul peak at start-up."""
    sample_prompt: Optional[str] = None
    """Text to continue greedily at the end of training (printed); null prints no sample."""
    sample_tokens: int = 48
    """Tokens generated for the end-of-run sample."""
    compile: bool = False
    """torch.compile each block's attention and MLP (first step compiles; cached; falls back to eager on failure)."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Steps between checkpoints; 0 saves only at the end and on signals."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted."""
    resume: str = "none"
    """none, auto (the newest complete checkpoint in the run directory), or a checkpoint path."""
    on_save_error: str = "continue"
    """When a save fails (e.g. a full disk): continue training (and try again at the next checkpoint), or stop
    at once (exit code 4); earlier checkpoints stay intact. Either way a run whose final checkpoint could not
    be written exits with code 4, not 0."""
    trust_pickles: bool = False
    """Load a checkpoint's pickles even when they reference classes outside Loom's allowlist (a checkpoint
    written by a newer DeepSpeed, say). Loading a pickle can run code: only for checkpoints you trust."""


@dataclass
class RunConfig:
    name: str = "loom"
    """Run name, used in log lines and TensorBoard."""
    output_dir: str = "runs/loom"
    """Run directory: checkpoints, TensorBoard logs and the resolved config go here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network's shape."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor, pipeline and data parallelism and the ZeRO stage."""
    techniques: TechniquesConfig = field(default_factory=TechniquesConfig)
    """LCM, SCR, CMR, SCA and HCMA switches and knobs."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    deepspeed_json: Optional[str] = None
    """Optional DeepSpeed JSON overlaid on the generated engine config, for options Loom does not model."""


# ------------------------------------------------------------------------------------- loading
def _leaves(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        if not tree and prefix:
            yield prefix, tree
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def _known_keys(cls, prefix: str = "") -> dict[str, Any]:
    keys = {}
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        keys[path] = f
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.update(_known_keys(type(default), path + "."))
    return keys


def _unknown_key_message(path: str, known: dict[str, Any]) -> str:
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    candidates = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6) or difflib.get_close_matches(
        path, list(known), n=1, cutoff=0.75
    )
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{path}'{hint}"


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as exc:  # yaml.YAMLError and OmegaConf grammar errors alike
        raise ConfigError([f"{path} is not valid YAML: {str(exc).splitlines()[0]}"]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path} must hold a mapping of config keys, not {type(loaded).__name__}"])
    return loaded


def _parse_overrides(overrides: list[str]) -> dict:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([f"override '{o}' is not of the form key=value" for o in bad])
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError([f"cannot parse overrides: {str(exc).splitlines()[0]}"]) from None


def load_config(
    path: str | None = None, overrides: list[str] | None = None, world_size: int | None = None, check_files: bool = True
) -> RunConfig:
    """Defaults ← YAML file ← dotted overrides, then validation. Raises ConfigError."""
    schema = OmegaConf.structured(RunConfig)
    known = _known_keys(RunConfig)
    problems: list[str] = []
    for source in ([_read_yaml(path)] if path else []) + [_parse_overrides(overrides or [])]:
        for key, value in _leaves(source):
            if key not in known:
                problems.append(_unknown_key_message(key, known))
                continue
            try:
                OmegaConf.update(schema, key, value, merge=True)
            except OmegaConfBaseException as exc:
                expected = getattr(known[key].type, "__name__", str(known[key].type))
                problems.append(
                    f"'{key}': cannot use {value!r} ({type(value).__name__}) for a field of type "
                    f"{expected}: {str(exc).splitlines()[0]}"
                )
    cfg: RunConfig = OmegaConf.to_object(schema)  # the keys that were valid are applied
    problems += validate(cfg, world_size, check_files)
    if problems:
        raise ConfigError(problems)
    # stage-local CMR sees pipeline × virtual_stages stages: each model chunk is a stage of its own
    stages = max(cfg.parallel.pipeline, 1) * max(cfg.parallel.virtual_stages, 1)
    for warning in cfg.techniques.warnings(cfg.model.num_layers, stages):
        logging.getLogger(__name__).warning(f"techniques.{warning}")
    return cfg


def validate(cfg: RunConfig, world_size: int | None = None, check_files: bool = True) -> list[str]:
    """Every semantic problem, one line each (types are already checked by OmegaConf)."""
    p = cfg.parallel
    problems = p.validate(world_size)
    problems += cfg.model.validate(
        p.tensor if p.tensor > 0 else 1, p.pipeline if p.pipeline > 0 else 1, max(p.virtual_stages, 1)
    )
    shard = None
    if p.sequence_parallel and p.tensor > 1:
        shard = cfg.model.seq_length // p.tensor
        if cfg.model.seq_length % p.tensor:
            problems.append(
                f"parallel.sequence_parallel splits model.seq_length={cfg.model.seq_length} over "
                f"parallel.tensor={p.tensor} ranks: it must divide evenly"
            )
    problems += cfg.techniques.validate(cfg.model.num_layers, sequence_shard=shard)
    problems += cfg.data.validate()
    t, o, c = cfg.train, cfg.optim, cfg.checkpoint
    for name in ("micro_batch_size", "max_steps", "log_every"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name} must be positive, got {getattr(t, name)}")
    for name, value in (
        ("train.eval_every", t.eval_every),
        ("train.max_minutes", t.max_minutes),
        ("checkpoint.every", c.every),
        ("optim.warmup_steps", o.warmup_steps),
        ("optim.grad_clip", o.grad_clip),
        ("optim.weight_decay", o.weight_decay),
        ("train.mfu_peak_tflops", t.mfu_peak_tflops),
    ):
        if value < 0:
            problems.append(f"{name} must not be negative, got {value}")
    if c.on_save_error not in ("continue", "stop"):
        problems.append(f"checkpoint.on_save_error must be continue or stop, got '{c.on_save_error}'")
    if c.keep_last <= 0:
        problems.append(f"checkpoint.keep_last must be positive, got {c.keep_last}")
    if t.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"train.precision must be auto, fp32 or bf16, got '{t.precision}' (fp16 is not supported)")
    if o.schedule not in ("cosine", "linear", "constant"):
        problems.append(f"optim.schedule must be cosine, linear or constant, got '{o.schedule}'")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        problems.append(f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0, got lr={o.lr} min_lr={o.min_lr}")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.eps <= 0:
        problems.append("optim.beta1 and optim.beta2 must be in [0, 1) and optim.eps positive")
    if cfg.model.tie_embeddings and p.pipeline > 1 and p.zero_stage == 2:
        problems.append(
            "model.tie_embeddings with parallel.pipeline > 1 needs zero_stage 0 or 1: ZeRO-2 reduces "
            "gradients during backward, before the two stages' embedding copies can be summed"
        )
    if t.compile and p.zero_stage == 3:
        problems.append(
            "train.compile needs zero_stage 0, 1 or 2: ZeRO-3 gathers each module's parameters in "
            "forward hooks that would run inside the compiled blocks"
        )
    if t.compile and p.sequence_parallel:
        problems.append(
            "train.compile with parallel.sequence_parallel is not supported yet: the compiled blocks would "
            "contain megatron's sequence-parallel collectives; turn one of them off"
        )
    if c.resume not in ("none", "auto") and check_files and not os.path.exists(c.resume):
        problems.append(f"checkpoint.resume: no checkpoint at '{c.resume}'")
    for key in ("train_data", "eval_data", "tokenizer"):
        value = getattr(cfg.data, key)
        if value and check_files and "://" not in value and not value.startswith("pipe:") and not os.path.exists(value):
            problems.append(f"data.{key}: no such file or directory: {value}")
    if cfg.deepspeed_json and check_files and not os.path.isfile(cfg.deepspeed_json):
        problems.append(f"deepspeed_json: file not found: {cfg.deepspeed_json}")
    return problems


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# ------------------------------------------------------------------------------------- saved configs
def _drop_unknown(tree: Any, cls) -> Any:
    """Keys of a saved config dict that this (possibly newer or older) schema lacks are dropped."""
    if not isinstance(tree, dict) or not is_dataclass(cls):
        return tree
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in tree.items():
        if key not in known:
            continue
        f = known[key]
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        out[key] = _drop_unknown(value, type(default)) if is_dataclass(default) else value
    return out


def _structured_from_saved(cls, saved: dict | None):
    merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(_drop_unknown(saved or {}, cls)))
    return OmegaConf.to_object(merged)


def config_from_saved(saved: dict) -> RunConfig:
    """The RunConfig a checkpoint or consolidated folder was written with (its resolved config dict),
    tolerant of keys a newer or older Loom added or removed. Raises ConfigError on values that no
    longer fit the schema."""
    try:
        return _structured_from_saved(RunConfig, saved)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"the saved config cannot be read: {str(exc).splitlines()[0]}"]) from None


def model_config_from_saved(saved: dict | None) -> ModelConfig:
    return ModelConfig(**_drop_unknown(saved or {}, ModelConfig))


def techniques_from_saved(saved: dict | None) -> TechniquesConfig:
    return _structured_from_saved(TechniquesConfig, saved)
