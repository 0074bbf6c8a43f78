"""Hugging Face export (`loom convert to-hf`); the import (`loom convert from-hf`) is `launch.convert_from_hf`.

to-hf writes a `LlamaForCausalLM` folder when the network is a plain Llama: no technique that changes
the forward pass is on, or each one is still the exact identity (LCM strength 0, SCR and CMR output
maps 0), so it folds away. HCMA needs nothing (the aligned table *is* the embedding) and SCA is
training-only (dropped). Otherwise — LCM, SCR or CMR active — the export needs Loom's own modeling
code: `--remote-code` copies `configuration_loom.py` and `modeling_loom.py` into the folder and
points `auto_map` at them, for `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`.

Weight mapping (Loom → Llama), all exact:
* `layers.i.attention.qkv.weight` rows are grouped per key/value head g: [q heads of g, k_g, v_g]
  → `q_proj` (all q heads in order), `k_proj`, `v_proj`. RoPE is HF's split-half layout in both, so
  no row permutation.
* `layers.i.mlp.gate_up.weight` rows interleave gate_0, up_0, gate_1, … → `gate_proj`, `up_proj`.
* vocabulary padding rows are cut; `tie_word_embeddings` mirrors `model.tie_embeddings`.

Tokens: Loom's training loss adds no BOS (documents are packed and separated by EOS), while the
exported tokenizer adds `<s>` like Llama's. The ids of the text itself are identical; a prompt that
starts with BOS is a slightly different context from what the model mostly saw in training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from loom.launch.checkpoint.consolidated import Consolidated, output_folder, save_safetensors
from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import TOKENIZER
from loom.launch.checkpoint.meta import pipeline_stages
from loom.launch.checkpoint.reader import load
from loom.model.state_dict_adapter import is_training_only, to_llama

log = logging.getLogger(__name__)

HF_README = """# {name} (exported by `loom convert to-hf`)

* Architecture: `{arch}`{remote}
* Source: `{source}` (step {step})
* Tokenizer: the run's SentencePiece model (`tokenizer.model`), exported as a `LlamaTokenizer`
  that **adds `<s>` (BOS, id {bos})** in front of every encoded text, as Llama does.
  Loom trains on packed documents separated by `</s>` (EOS, id {eos}) and **adds no BOS**; the ids of
  the text itself are identical. For log-likelihoods that match Loom's evaluation, encode with
  `add_special_tokens=False`.
{extra}"""

LLAMA_TECHNIQUES = ("lcm", "scr", "cmr")
"""Techniques that change the forward pass (HCMA and SCA do not)."""


# ------------------------------------------------------------------------------------- weights
def _drop_for_export(weights: dict) -> dict:
    """Training-only tensors: SCA heads and field buffers, CMR's reconstruction maps."""
    return {k: v for k, v in weights.items() if not is_training_only(k)}


def active_techniques(weights: dict, tech) -> list[str]:
    """Techniques whose parameters make them differ from the identity (so Llama cannot express them)."""
    active = []
    if tech.lcm.enabled:
        alphas = [v for k, v in weights.items() if k.endswith(".lcm.alpha")]
        if any(bool((a > 0).any()) if tech.lcm.clamp else bool((a != 0).any()) for a in alphas):
            active.append("LCM")
    if tech.scr.enabled and any(bool(v.ne(0).any()) for k, v in weights.items() if k.endswith(".scr.up.weight")):
        active.append("SCR")
    if tech.cmr.enabled and any(bool(v.ne(0).any()) for k, v in weights.items() if k.endswith(".reweave.out.weight")):
        active.append("CMR")
    return active


# ------------------------------------------------------------------------------------- tokenizer
def _sp_info(path: Path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise ConvertError(f"{path} is not a SentencePiece model: {str(exc).splitlines()[0]}") from None
    model_type = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    return sp, model_type


SELF_CHECK_TEXTS = (
    "Hello world",
    "To be, or not to be: that is the question.",
    "x = 12345 + 0.5e-3;\nprint(x)  # two  spaces",
    "naïve café — 東京 😀 ∑",
    "ends with space ",
)


def export_tokenizer(tokenizer_model: Path, out: Path, vocab_size: int) -> None:
    """SentencePiece BPE `.model` → `LlamaTokenizer` files (+ the .model itself) in `out`."""
    sp, model_type = _sp_info(tokenizer_model)
    if sp.get_piece_size() != vocab_size:
        raise ConvertError(
            f"the tokenizer has {sp.get_piece_size()} pieces but the model's vocabulary is "
            f"{vocab_size}: mismatched tokenizer"
        )
    if model_type != "bpe":
        raise ConvertError(
            f"the tokenizer is a SentencePiece {model_type} model; only BPE exports to an exact "
            f"Hugging Face LlamaTokenizer (pass --skip-tokenizer to export the weights alone)"
        )
    from transformers import LlamaTokenizer

    def piece(i):
        return sp.id_to_piece(i) if i >= 0 else None

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tokenizer_model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(
            tmp,
            add_bos_token=True,
            add_eos_token=False,
            bos_token=piece(sp.bos_id()),
            eos_token=piece(sp.eos_id()),
            unk_token=piece(sp.unk_id()),
            pad_token=piece(sp.pad_id()),
        )
    bad = [t for t in SELF_CHECK_TEXTS if tok.encode(t, add_special_tokens=False) != sp.encode(t)]
    if bad:
        log.info(
            f"warning: the exported tokenizer encodes {len(bad)} of {len(SELF_CHECK_TEXTS)} check strings "
            f"differently from SentencePiece (e.g. {bad[0]!r})"
        )
    tok.save_pretrained(str(out))
    shutil.copyfile(tokenizer_model, out / TOKENIZER)


# ------------------------------------------------------------------------------------- to-hf
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _special_ids(data: Consolidated, cfg) -> dict:
    ids = {"bos_token_id": 2, "eos_token_id": cfg.eos_id, "pad_token_id": 0}
    if data.tokenizer is not None:
        sp, _ = _sp_info(data.tokenizer)
        ids = {
            "bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None,
            "eos_token_id": cfg.eos_id,
            "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None,
        }
    return ids


def remote_code_techniques(tech, cfg, source_pp: int) -> dict:
    """The techniques dict of `LoomConfig`: resolved block/state indices and the knobs inference uses."""
    from loom.model.gpt import stage_layer_range
    from loom.model.technique_plan import TechniquePlan

    plan = TechniquePlan.from_config(tech, cfg.num_layers)
    out: dict = {}
    if tech.lcm.enabled:
        c = tech.lcm
        out["lcm"] = {
            "blocks": sorted(plan.lcm_blocks),
            "K": c.K,
            "beta": c.beta,
            "a_max": c.a_max,
            "n_iter": c.n_iter,
            "gate": c.gate,
            "clamp": c.clamp,
            "placement": c.placement,
        }
    if tech.scr.enabled:
        c = tech.scr
        out["scr"] = {
            "blocks": list(plan.scr_blocks),
            "rank": c.rank,
            "gamma": c.gamma,
            "decay": c.decay,
            "placement": c.placement,
        }
    if tech.cmr.enabled:
        readable = {}
        for target in plan.cmr_targets:
            first = None
            if plan.cmr_stage_local:  # which pipeline stage of the saved layout held the target block
                per_stage = cfg.num_layers // source_pp
                first = stage_layer_range(cfg.num_layers, source_pp, (target - 1) // per_stage).start
            readable[str(target)] = plan.slots_before(target, first)
        out["cmr"] = {
            "sources": list(plan.cmr_sources),
            "targets": list(plan.cmr_targets),
            "rank": tech.cmr.rank,
            "readable": readable,
            # stage-local CMR carries no bank between the saved layout's pipeline stages
            "reset_bank_at": [r * (cfg.num_layers // source_pp) for r in range(1, source_pp)]
            if plan.cmr_stage_local
            else [],
        }
    return out


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConvertError(
            "exporting to Hugging Face needs the transformers package: pip install transformers"
        ) from None


def to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    remote_code: bool = False,
    dtype: str = "fp32",
    tokenizer: Optional[str] = None,
    skip_tokenizer: bool = False,
    force: bool = False,
    trust_pickles: bool = False,
) -> Path:
    """`loom convert to-hf`: checkpoint or consolidated folder → Hugging Face model folder."""
    _require_transformers()
    if dtype not in _DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConvertError(f"--tokenizer {tokenizer}: no such file")
    data = load(ckpt, trust_pickles=trust_pickles)
    if tokenizer is not None:
        data.tokenizer = Path(tokenizer)
    cfg, tech = data.model, data.techniques
    for note in data.notes:
        log.info(f"note: {note}")
    weights = _drop_for_export(data.weights)
    active = active_techniques(weights, tech)
    if active and not remote_code:
        names = ", ".join(active[:-1]) + (" and " if len(active) > 1 else "") + active[-1]
        raise ConvertError(
            f"{names} {'is' if len(active) == 1 else 'are'} on and trained, which "
            f"LlamaForCausalLM cannot express; pass --remote-code to export with Loom's own "
            f"modeling code (trust_remote_code=True)"
        )
    if data.tokenizer is None and not skip_tokenizer:
        raise ConvertError("the checkpoint has no tokenizer.model; pass --tokenizer PATH or --skip-tokenizer")
    dropped = any(".sca." in k for k in data.weights)
    torch_dtype = _DTYPES[dtype]
    special = _special_ids(data, cfg)
    step = data.state.get("step", "?")
    with output_folder(out, force) as tmp:
        if remote_code:
            arch = "LoomForCausalLM"
            _write_remote_code(tmp, data, weights, cfg, tech, torch_dtype, dtype, special)
        else:
            arch = "LlamaForCausalLM"
            _write_llama(tmp, weights, cfg, torch_dtype, dtype, special)
            folded = [t.upper() for t in LLAMA_TECHNIQUES if getattr(tech, t).enabled]
            if folded:
                log.info(
                    f"note: {', '.join(folded)} {'is' if len(folded) == 1 else 'are'} on but still the identity; "
                    f"exported as a plain Llama"
                )
        if not skip_tokenizer:
            export_tokenizer(data.tokenizer, tmp, cfg.vocab_size)
        extra = ""
        if tech.sca.enabled:
            extra += "* SCA (training-only) heads and statistics are not part of the export.\n"
        if tech.hcma.enabled:
            extra += "* HCMA shaped the embedding table during training; nothing else is needed at inference.\n"
        if remote_code:
            extra += (
                "* Remote code: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; `generate()` "
                "keeps keys, values and LCM/SCR's state in the cache; batches may be left-padded.\n"
            )
        (tmp / "README.md").write_text(
            HF_README.format(
                name=data.run_config.get("name", "loom"),
                arch=arch,
                source=data.source.get("checkpoint", ckpt),
                step=step,
                bos=special["bos_token_id"],
                eos=special["eos_token_id"],
                remote=" (remote code: `trust_remote_code=True`)" if remote_code else "",
                extra=extra,
            )
        )
    log.info(
        f"exported {arch} ({dtype}) to {out}"
        + ("" if skip_tokenizer else " with its tokenizer (it adds BOS; Loom's training adds none)")
        + ("; training-only SCA heads dropped" if dropped else "")
    )
    return Path(out)


def _write_llama(tmp: Path, weights: dict, cfg, torch_dtype, dtype: str, special: dict) -> None:
    from transformers import GenerationConfig, LlamaConfig

    sd = to_llama(weights, cfg)  # technique tensors (identity here) are left behind
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=special["bos_token_id"],
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
    )
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf_cfg.dtype = _DTYPE_NAMES[dtype]
    hf_cfg.save_pretrained(str(tmp))
    GenerationConfig(
        bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"]
    ).save_pretrained(str(tmp))
    save_safetensors({k: v.to(torch_dtype) for k, v in sd.items()}, tmp / "model.safetensors")


def _write_remote_code(
    tmp: Path, data: Consolidated, weights: dict, cfg, tech, torch_dtype, dtype: str, special: dict
) -> None:
    import transformers

    from loom.launch.convert.hf_modeling import FILES, HERE

    # each model chunk of an interleaved layout is a stage of its own for stage-local CMR
    techniques = remote_code_techniques(tech, cfg, pipeline_stages(data.source.get("layout")))
    config = {
        "architectures": ["LoomForCausalLM"],
        "model_type": "loom",
        "auto_map": {
            "AutoConfig": "configuration_loom.LoomConfig",
            "AutoModelForCausalLM": "modeling_loom.LoomForCausalLM",
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_length,
        "rope_theta": float(cfg.rope_theta),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "techniques": techniques,
        "document_eos_id": cfg.eos_id,
        "use_cache": True,
        "dtype": _DTYPE_NAMES[dtype],
        "transformers_version": transformers.__version__,
        **special,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {**special, "use_cache": True, "transformers_version": transformers.__version__}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in FILES:
        shutil.copyfile(HERE / name, tmp / name)
    keep = {k: v for k, v in weights.items() if not (cfg.tie_embeddings and k == "output_layer.weight")}
    save_safetensors(
        {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in keep.items()}, tmp / "model.safetensors"
    )
