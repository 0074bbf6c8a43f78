"""The `environment` check: the device, and every package Loom imports, with where it came from
(the machine's own site-packages or the carried wheels installed under /tmp/site)."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import subprocess

from tests.gpu.common import Context, Result

MODULES = {
    "torch": "torch",
    "deepspeed": "deepspeed",
    "megatron.core": "megatron-core",
    "transformers": "transformers",
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "torchdata": "torchdata",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "hjson": "hjson",
    "pydantic": "pydantic",
    "sentencepiece": "sentencepiece",
    "tensorboard": "tensorboard",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "psutil": "psutil",
    "filelock": "filelock",
    "yaml": "PyYAML",
    "tqdm": "tqdm",
    "msgpack": "msgpack",
    "einops": "einops",
    "loom.launch.cli": "loom",
    "loom.launch.train.run": "loom",
    "loom.launch.convert.hf_export": "loom",
    "loom.launch.bench.section_gpu": "loom",
}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def environment(ctx: Context) -> Result:
    import warnings

    warnings.filterwarnings("ignore")
    result = Result(ctx.name)
    site = os.environ.get("LOOM_GPU_SITE", "")
    modules, missing = {}, []
    for module, dist in MODULES.items():
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - an import failure of any kind is the finding
            missing.append(module)
            modules[module] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        where = getattr(imported, "__file__", None) or str(list(getattr(imported, "__path__", []))[:1])
        origin = "wheel" if site and site in str(where) else "machine"
        modules[module] = f"{_version(dist)} ({origin})"
    result.details["modules"] = modules
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    result.details["platform"] = info
    if missing:
        return result.fail(f"cannot import {', '.join(missing)}")
    if not ctx.dry and not info["cuda_available"]:
        return result.fail("torch sees no CUDA device")
    device = info.get("device", "CPU (dry run)")
    result.summary = (
        f"Python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), {device}; "
        f"{len(MODULES)} imports ok ({sum('(wheel)' in v for v in modules.values())} from carried wheels)"
    )
    return result
