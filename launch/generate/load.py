"""The model `loom generate` decodes with: any model folder as one TP=1, PP=1 Loom stage in this process.

* A checkpoint of any TP×PP×DP×ZeRO layout, a run directory or a consolidated folder goes through the
  checkpoint reader (`reader.load`: full weights, every pickle through the allowlist) into a TP=1 stage
  (`start_point.load_into_stage`), as `loom eval` does with a ZeRO-3 checkpoint.
* A Hugging Face folder written by `loom convert to-hf` — a `LlamaForCausalLM`, or Loom's remote code
  (`model_type: loom`) — is read from its config.json and safetensors only: no pickle is loaded and none
  of the folder's code runs. Weight names are Loom's own in a remote-code export and Llama's otherwise
  (`state_dict_adapter.from_llama`).

Stage-local CMR trained over several pipeline stages reads different sources in a one-stage model, so
such a model is refused rather than silently changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import TOKENIZER
from loom.launch.checkpoint.meta import pipeline_stages

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A stage ready to decode, with what `loom generate` needs around it."""

    stage: torch.nn.Module
    model: object
    """The `ModelConfig` (vocabulary size, EOS id, training sequence length)."""
    tokenizer: Optional[Path]
    """The folder's SentencePiece model, if it has one."""
    description: str


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "consolidated.json").is_file()


def techniques_from_hf(techniques: dict):
    """Loom's `TechniquesConfig` for the resolved `techniques` dict of a remote-code export (SCA and HCMA
    are not part of an export: the one is training-only, the other is the embedding table)."""
    from loom.techniques.config import TechniquesConfig

    tech = TechniquesConfig()
    lcm, scr, cmr = techniques.get("lcm"), techniques.get("scr"), techniques.get("cmr")
    if lcm:
        tech.lcm.enabled, tech.lcm.layers = True, ",".join(str(i) for i in lcm["blocks"])
        for key in ("K", "beta", "a_max", "n_iter", "gate", "clamp", "placement"):
            setattr(tech.lcm, key, lcm[key])
    if scr:
        tech.scr.enabled, tech.scr.layers = True, ",".join(str(i) for i in scr["blocks"])
        for key in ("rank", "gamma", "decay", "placement"):
            setattr(tech.scr, key, scr[key])
    if cmr:
        if cmr.get("reset_bank_at"):
            raise ConvertError(_STAGE_LOCAL.format(pp=len(cmr["reset_bank_at"]) + 1))
        tech.cmr.enabled, tech.cmr.rank = True, int(cmr["rank"])
        tech.cmr.include_embedding = 0 in cmr["sources"]
        tech.cmr.source_layers = [s for s in cmr["sources"] if s != 0]
        tech.cmr.target_layers = list(cmr["targets"])
    return tech


_STAGE_LOCAL = (
    "CMR is stage-local over the {pp} pipeline stages the model was trained with: a one-stage model would "
    "read other sources (a different network); `loom eval` runs it at its own layout"
)


def _read_hf(folder: Path):
    """(ModelConfig, TechniquesConfig, Loom-named fp32 weights) of a `loom convert to-hf` folder."""
    from loom.launch.convert.hf_import import _read_hf_config, _read_hf_weights, model_config_from_hf
    from loom.model.config import ModelConfig
    from loom.model.state_dict_adapter import from_llama
    from loom.techniques.config import TechniquesConfig

    hf = _read_hf_config(folder)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise ConvertError(f"{folder} has no safetensors weights (loom generate reads no pickle)")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in _read_hf_weights(folder).items()}
    if hf.get("model_type") != "loom":
        cfg = model_config_from_hf(hf)
        return cfg, TechniquesConfig(), from_llama(weights, cfg)
    eos = hf.get("document_eos_id", hf.get("eos_token_id"))
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        seq_length=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_id=None if eos is None else int(eos),
    )
    if cfg.tie_embeddings:
        weights.pop("output_layer.weight", None)
    return cfg, techniques_from_hf(hf.get("techniques") or {}), weights


def _read_checkpoint(path: str, trust_pickles: bool):
    from loom.launch.checkpoint.reader import load

    data = load(path, trust_pickles=trust_pickles)
    tech = data.techniques
    saved_pp = pipeline_stages(data.source.get("layout"))  # virtual stages: each model chunk is one
    if tech.cmr.enabled and tech.cmr.stage_local and saved_pp > 1:
        raise ConvertError(_STAGE_LOCAL.format(pp=saved_pp))
    return data.model, tech, data.weights, data.tokenizer


def load_model(path: str, layout, trust_pickles: bool = False, dtype=torch.float32, device=None) -> LoadedModel:
    """The folder's network as a bare TP=1 stage of `layout` (megatron's grid must be up), in eval mode."""
    from loom.launch.checkpoint.locate import locate_checkpoint
    from loom.launch.checkpoint.start_point import load_into_stage
    from loom.model.parallel.parallelize import build_stage

    folder = Path(path)
    if folder.is_dir() and is_hf_folder(folder):
        cfg, tech, weights = _read_hf(folder)
        tokenizer = folder / TOKENIZER if (folder / TOKENIZER).is_file() else None
        description = f"Hugging Face folder {folder}"
    else:
        cfg, tech, weights, tokenizer = _read_checkpoint(path, trust_pickles)
        description = f"checkpoint {locate_checkpoint(path)}"
    stage = build_stage(cfg, tech, layout, seed=0, dtype=torch.float32, device=device)
    fresh = load_into_stage(stage, weights, quiet=True)
    if fresh:  # a technique tensor left at its identity init would silently change the network
        raise ConvertError(f"{path}: the weights lack {len(fresh)} tensor(s) of the model, e.g. {fresh[0]}")
    stage = stage.to(dtype=dtype).eval()
    for p in stage.parameters():
        p.requires_grad_(False)
    return LoadedModel(stage, cfg, tokenizer, description)
