"""Loading a checkpoint never runs code from it (launch/checkpoint/unpickle.py).

A payload planted in Loom's per-rank state, DeepSpeed's model states or its optimizer states is
refused by `loom train --resume`, every `loom convert` subcommand and `loom eval` — with one line
naming the file and the global — before anything unpickles it, and the payload never runs. The
allowlist covers what real checkpoints of every layout contain."""

from __future__ import annotations

import pytest
import torch

from loom.launch.checkpoint.unpickle import DEEPSPEED_GLOBALS, UnsafeCheckpointError, load_deepspeed_file, load_plain
from tests.checkpoint.conftest import LAYOUTS, SHORT, tampered_copy
from tests.e2e.runner import TINY, run_loom


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_allowlist_covers_real_checkpoints(layout_checkpoints, layout):
    step = layout_checkpoints[layout] / "checkpoints" / "step_00000002"
    files = sorted(step.rglob("*.pt"))
    assert files
    for path in files:
        if path.parent.name == "loom":
            assert load_plain(path)["loader"] is not None  # Loom's own state: no global allowlisted at all
            continue
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - set(DEEPSPEED_GLOBALS)
        assert not unsafe, f"{path.name} holds {unsafe}"
        load_deepspeed_file(path)


@pytest.mark.slow  # layout_checkpoints trains six runs through torchrun
@pytest.mark.parametrize("which", ["rank", "model", "optim"])
def test_library_readers_refuse_a_payload(layout_checkpoints, tmp_path, which):
    _, target, marker = tampered_copy(layout_checkpoints["zero1_dp2"], tmp_path, which)
    loader = load_plain if which == "rank" else load_deepspeed_file
    with pytest.raises(UnsafeCheckpointError, match=rf"{target.name}.*io\.open.*--trust-checkpoint"):
        loader(target)
    assert not marker.exists()


def _refused(proc, marker, torchrun: bool = False) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "refusing to load" in text and "io.open" in text, text[-3000:]
    ranks_tracebacks = [line for line in text.splitlines() if "Traceback" in line and "[rank" in line]
    assert not ranks_tracebacks and (torchrun or "Traceback" not in proc.stderr), proc.stderr[-3000:]
    assert not marker.exists(), "the planted payload ran"


COMMANDS = {
    "train --resume": lambda step, out: [
        "train",
        TINY,
        f"output_dir={out}",
        *SHORT,
        "train.max_steps=3",
        "--resume",
        str(step),
    ],
    "convert consolidate": lambda step, out: ["convert", "consolidate", str(step), str(out), "--optimizer"],
    "convert to-hf": lambda step, out: ["convert", "to-hf", str(step), str(out), "--skip-tokenizer"],
    "convert reshard": lambda step, out: ["convert", "reshard", str(step), str(out), "--tensor", "1"],
    "convert align-embeddings": lambda step, out: ["convert", "align-embeddings", str(step), str(out)],
    "eval": lambda step, out: ["eval", str(step), "--metrics", "loss", "--out", str(out / "e.json")],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_payload_in_deepspeed_model_states(layout_checkpoints, tmp_path, command):
    step, _, marker = tampered_copy(layout_checkpoints["zero1_dp2"], tmp_path, "model")
    nproc = 2 if command.startswith("train") else 1
    proc = run_loom(COMMANDS[command](step, tmp_path / "out"), nproc=nproc, check=False)
    _refused(proc, marker, torchrun=nproc > 1)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["rank", "optim"])
def test_resume_refuses_a_payload_in_rank_and_optimizer_state(layout_checkpoints, tmp_path, which):
    step, _, marker = tampered_copy(layout_checkpoints["zero1_dp2"], tmp_path, which)
    proc = run_loom(COMMANDS["train --resume"](step, tmp_path / "out"), nproc=2, check=False)
    _refused(proc, marker, torchrun=True)
    assert "lost contact" not in proc.stdout + proc.stderr, "every rank must stop with the refusal"


@pytest.mark.slow
def test_consolidate_refuses_a_payload_in_optimizer_state(layout_checkpoints, tmp_path):
    step, _, marker = tampered_copy(layout_checkpoints["zero1_dp2"], tmp_path, "optim")
    proc = run_loom(COMMANDS["convert consolidate"](step, tmp_path / "out"), check=False)
    _refused(proc, marker)


@pytest.mark.slow
def test_trust_checkpoint_is_the_explicit_escape_hatch(layout_checkpoints, tmp_path):
    """With --trust-checkpoint the file is unpickled for real — which is exactly why it is off by default."""
    step, _, marker = tampered_copy(layout_checkpoints["zero1_dp2"], tmp_path, "model")
    proc = run_loom(["convert", "consolidate", str(step), str(tmp_path / "out"), "--trust-checkpoint"], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()


def test_nothing_else_unpickles_without_the_guard():
    """Every `torch.load` in the product is weights-only, except the one guarded place's explicit
    `--trust-checkpoint` branch; nothing calls `pickle.load` directly."""
    import ast

    from tests.architecture.import_graph import REPO, module_files

    guarded = REPO / "launch" / "checkpoint" / "unpickle.py"
    problems = []
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in ("pickle.load", "pickle.loads"):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno} calls {name}")
            if name == "torch.load" and path != guarded:
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") != "True":
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} torch.load without weights_only=True")
    assert not problems, problems
