"""`loom convert from-hf`: a Hugging Face `LlamaForCausalLM` folder (and its SentencePiece tokenizer)
into a Loom consolidated folder, the start point `loom train --resume` / `model.init_from` accept.
The weight mapping is `loom.model.state_dict_adapter` (the same table as the export)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from loom.launch.checkpoint.consolidated import Consolidated, output_folder, write_consolidated
from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import TOKENIZER
from loom.launch.convert.hf_export import _sp_info
from loom.model.state_dict_adapter import expected_shapes, from_llama

log = logging.getLogger(__name__)


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConvertError(f"{path} is not valid JSON") from None


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict = {}
            for f in files:
                out.update(load_file(str(hf_dir / f)))
            return out
        binary = hf_dir / "pytorch_model.bin"
        if binary.is_file():
            return torch.load(binary, map_location="cpu", weights_only=True)
    except ConvertError:
        raise
    except Exception as exc:
        raise ConvertError(f"cannot read the weights in {hf_dir}: {str(exc).splitlines()[0]}") from None
    raise ConvertError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def model_config_from_hf(hf: dict):
    """A Loom ModelConfig for a Llama-architecture HF config, or ConvertError for what Loom lacks."""
    from loom.model.config import ModelConfig

    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ConvertError(
            f"only Llama-architecture models convert (model_type 'llama'), got {hf.get('model_type')!r} {arch}"
        )
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (Loom uses SwiGLU/silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention or MLP biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        problems.append(f"RoPE scaling {rope_type!r}")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, d // heads):
        problems.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
    if problems:
        raise ConvertError("this model uses features Loom does not implement: " + "; ".join(problems))
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or hf.get("rope_theta", 10000.0)
    eos = hf.get("eos_token_id", 3)
    eos = eos[0] if isinstance(eos, list) else eos
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=d,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        seq_length=int(min(hf.get("max_position_embeddings", 2048), 4096)),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_id=int(eos if eos is not None else 3),
    )
    shape_problems = cfg.validate(1, 1)
    if shape_problems:
        raise ConvertError("the model's shape is not valid for Loom: " + "; ".join(shape_problems))
    return cfg


def from_hf(
    hf_dir: str | os.PathLike, out: str | os.PathLike, tokenizer: Optional[str] = None, force: bool = False
) -> Path:
    """`loom convert from-hf`: Llama HF folder → a Loom start point (consolidated folder + config.yaml)."""
    from dataclasses import fields

    from loom.launch.config import RunConfig, to_dict, to_yaml
    from loom.model.config import ModelConfig

    src = Path(hf_dir)
    if not src.is_dir():
        raise ConvertError(f"{hf_dir}: no such folder")
    hf = _read_hf_config(src)
    cfg = model_config_from_hf(hf)
    tok_path = Path(tokenizer) if tokenizer else (src / TOKENIZER)
    if tokenizer and not tok_path.is_file():
        raise ConvertError(f"--tokenizer {tokenizer}: no such file")
    if tok_path.is_file():
        sp, _ = _sp_info(tok_path)
        if sp.get_piece_size() != cfg.vocab_size:
            raise ConvertError(
                f"mismatched tokenizer: {tok_path} has {sp.get_piece_size()} pieces but the model's "
                f"vocab_size is {cfg.vocab_size} (Loom needs them equal)"
            )
        if sp.eos_id() != cfg.eos_id:
            raise ConvertError(
                f"mismatched tokenizer: {tok_path} has EOS id {sp.eos_id()} but the model's "
                f"eos_token_id is {cfg.eos_id}"
            )
    else:
        tok_path = None
    hf_weights = _read_hf_weights(src)
    try:
        weights = from_llama(hf_weights, cfg)
    except KeyError as exc:
        raise ConvertError(str(exc.args[0])) from None
    for name, shape in expected_shapes(cfg).items():
        if tuple(weights[name].shape) != shape:
            raise ConvertError(f"{name} has shape {tuple(weights[name].shape)}, config implies {shape}")
    run = RunConfig()
    run.name = src.resolve().name
    run.model = cfg
    run.output_dir = f"runs/{run.name}"
    run.checkpoint.resume = "auto"
    out_abs = Path(out).resolve()
    if tok_path is not None:
        run.data.tokenizer = str(out_abs / TOKENIZER)
    has_init_from = "init_from" in {f.name for f in fields(ModelConfig)}
    if has_init_from:
        run.model.init_from = str(out_abs)  # type: ignore[attr-defined]
    data = Consolidated(
        weights=weights,
        run_config=to_dict(run),
        state={"step": 0, "consumed_tokens": 0, "skipped_steps": 0, "consecutive_nonfinite": 0},
        source={"hf": str(src.resolve()), "model_type": hf.get("model_type")},
        tokenizer=tok_path,
    )
    with output_folder(out, force) as tmp:
        write_consolidated(data, tmp, kind="from-hf")
        header = (
            f"# Loom run config for continued pretraining of {src.resolve()}\n"
            f"# (written by `loom convert from-hf`; edit data/parallel/techniques freely — techniques start\n"
            f"# as the identity). Start: loom train {out_abs / 'config.yaml'}"
            + ("" if has_init_from else f" --resume {out_abs}")
            + "\n"
        )
        (tmp / "config.yaml").write_text(header + to_yaml(run))
    n = sum(v.numel() for v in weights.values())
    log.info(
        f"converted {src} ({n:,} parameters) → Loom start point {out}"
        + (
            ""
            if tok_path
            else " (no tokenizer.model found: set data.tokenizer to a SentencePiece model with "
            f"{cfg.vocab_size} pieces)"
        )
        + f"\n  train with: loom train {Path(out) / 'config.yaml'}"
        + ("" if has_init_from else f" --resume {out}")
    )
    return Path(out)
