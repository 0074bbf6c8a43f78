"""Loading a checkpoint never runs code from it: the one place Loom unpickles checkpoint files.

A `.pt` file is a pickle, and a pickle may name any Python callable (`os.system`, say) to be called
while it loads. The manifest's sha256 proves a file is the one that was written, not that whoever wrote
it meant well. So every pickle Loom reads is loaded with torch's weights-only unpickler, which builds
only tensors, plain containers and an explicit allowlist of classes:

* Loom's own per-rank state (`loom/rank_N.pt`) is plain data — tensors, numbers, strings, lists,
  dicts — and is read with nothing allowlisted (`load_plain`).
* DeepSpeed's model and optimizer states legitimately contain a few DeepSpeed and torch classes
  (`DEEPSPEED_GLOBALS`); Loom's own readers load them under that allowlist (`load_deepspeed_file`),
  and before DeepSpeed's own loader (which unpickles without a guard) reads a checkpoint, every file
  it may read is checked the same way first (`check_deepspeed_files`).

A file that names anything else is refused with one line naming the file and the global. A checkpoint
a user trusts that fails the check (e.g. one written by a newer DeepSpeed) loads with
`--trust-checkpoint` / `checkpoint.trust_pickles=true`, which is off by default.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

from loom.launch.checkpoint.errors import ConvertError

TRUST_HINT = "if you trust this checkpoint, pass --trust-checkpoint (checkpoint.trust_pickles=true)"

DEEPSPEED_GLOBALS = (
    # what DeepSpeed 0.19's ZeRO 0-3 (fp32 and bf16, with and without pipeline stages) checkpoints
    # contain beyond torch's own weights-only types; tests/checkpoint/test_unpickle.py checks each layout
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


_TORCH_SAFE = {
    # what torch's weights-only unpickler builds on its own (named here only to word the refusal)
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "collections.OrderedDict",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.BoolStorage",
    "torch.ByteStorage",
    "torch.float32",
    "torch.bfloat16",
    "torch.device",
    "torch.Size",
}


class UnsafeCheckpointError(ConvertError):
    """A checkpoint file references a global outside the allowlist; nothing was unpickled for real."""


def _resolve(qualified: str):
    module, _, name = qualified.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _allowed() -> list:
    out = []
    for qualified in DEEPSPEED_GLOBALS:
        try:
            out.append(_resolve(qualified))
        except (ImportError, AttributeError):  # absent in this DeepSpeed version: nothing to allow
            continue
    return out


def global_references(path: Path) -> list[str]:
    """The `module.name` globals a torch checkpoint's pickles reference, read without unpickling
    (a `pickletools` walk: each STACK_GLOBAL takes the two strings pushed or fetched just before it)."""
    import pickletools
    import zipfile

    found: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for name in [n for n in archive.namelist() if n.endswith(".pkl")]:
            strings: list = []
            memo: dict = {}
            for op, arg, _ in pickletools.genops(archive.read(name)):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(arg))
                elif op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    return found


def _refuse(path: Path, exc: Exception) -> UnsafeCheckpointError:
    """One line naming the file and the first global outside the allowlist."""
    try:
        named = global_references(path)
    except Exception:  # noqa: BLE001 - not a torch zip file: say what the unpickler said
        named = []
    allowed = set(DEEPSPEED_GLOBALS) | _TORCH_SAFE
    names = [g for g in named if g not in allowed]
    what = f"references {names[0]}" if names else f"cannot be read safely ({str(exc).splitlines()[0][:200]})"
    return UnsafeCheckpointError(f"refusing to load {path}: it {what}, which is not on Loom's allowlist; {TRUST_HINT}")


def _load(path: Path, allow: list, trust: bool, mmap: bool):
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)  # the user's explicit choice
    try:
        with torch.serialization.safe_globals(allow), warnings.catch_warnings():
            # a pickle of another protocol than torch.save's is refused below anyway: no extra warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError (and others) for what it will not build
        if isinstance(exc, FileNotFoundError):
            raise
        if "Unsupported global" in str(exc) or "Weights only load failed" in str(exc):
            raise _refuse(path, exc) from None
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConvertError(f"cannot read {path}: {type(exc).__name__}: {first}") from None


def load_plain(path: Path, trust: bool = False):
    """Loom's own state files: tensors and plain Python data only."""
    return _load(Path(path), [], trust, mmap=False)


def load_deepspeed_file(path: Path, trust: bool = False):
    """A DeepSpeed model/optimizer state file, for Loom's own readers (memory-mapped)."""
    return _load(Path(path), _allowed(), trust, mmap=True)


def check_deepspeed_files(ds_dir: Path) -> None:
    """Check every pickle DeepSpeed's `load_checkpoint` may read on this rank — its model-parallel
    rank's model states and every data-parallel shard of its optimizer states — before it reads them."""
    for path in deepspeed_files_of_this_rank(ds_dir):
        load_deepspeed_file(path)


def deepspeed_files_of_this_rank(ds_dir: Path) -> list[Path]:
    """The .pt files of `ds_dir` that this rank's engine may load: those of its model-parallel rank
    (all of them without a model-parallel group, e.g. a single process)."""
    files = sorted(Path(ds_dir).glob("*.pt"))
    try:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return files
        mp_rank = ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size()
        mp_rank += ps.get_tensor_model_parallel_rank()
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return files
    return [f for f in files if f"mp_rank_{mp_rank:02d}" in f.name]
