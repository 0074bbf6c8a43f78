"""Bad input gives one `error:` line and exit code 2, never a library traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.cli import main
from tests.e2e.runner import run_loom


def _fails(capsys, argv, expected: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
def test_wrong_paths(capsys, tmp_path, ckpt_tp2_pp2):
    _fails(capsys, ["convert", "consolidate", str(tmp_path / "nope"), str(tmp_path / "o")], "no such file")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["convert", "to-hf", str(tmp_path / "empty"), str(tmp_path / "o")], "neither a Loom checkpoint")
    _fails(capsys, ["convert", "from-hf", str(tmp_path / "empty"), str(tmp_path / "o")], "no config.json")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    _fails(capsys, ["convert", "consolidate", ckpt_tp2_pp2, str(tmp_path / "taken")], "already exists")


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
def test_partial_and_corrupted_checkpoints(capsys, tmp_path, ckpt_tp2_pp2):
    partial = tmp_path / "partial"
    shutil.copytree(ckpt_tp2_pp2, partial)
    (partial / "MANIFEST.json").unlink()
    _fails(capsys, ["convert", "consolidate", str(partial), str(tmp_path / "o")], "incomplete write")
    corrupted = tmp_path / "corrupted"
    shutil.copytree(ckpt_tp2_pp2, corrupted)
    victim = corrupted / "ds" / "state" / "mp_rank_01_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    _fails(capsys, ["convert", "to-hf", str(corrupted), str(tmp_path / "o")], "sha256")
    # a run directory whose only checkpoint is partial
    run = tmp_path / "run"
    shutil.copytree(partial, run / "checkpoints" / "step_00000002")
    _fails(capsys, ["convert", "reshard", str(run), str(tmp_path / "o")], "no complete checkpoint")


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
def test_unsupported_combination_and_bad_layout(capsys, tmp_path, ckpt_techniques, ckpt_tp2_pp2):
    _fails(capsys, ["convert", "to-hf", ckpt_techniques, str(tmp_path / "o")], "pass --remote-code")
    _fails(capsys, ["convert", "reshard", ckpt_tp2_pp2, str(tmp_path / "o"), "--tensor", "3"], "not divisible")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> str:
    from loom.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    text = folder / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    return str(train_tokenizer([str(text)], folder / "small", vocab_size=300))


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
def test_mismatched_tokenizers(capsys, tmp_path, ckpt_tp2_pp2, small_tokenizer):
    _fails(
        capsys,
        ["convert", "to-hf", ckpt_tp2_pp2, str(tmp_path / "o"), "--tokenizer", small_tokenizer],
        "mismatched tokenizer",
    )
    hf = tmp_path / "hf"
    assert main(["convert", "to-hf", ckpt_tp2_pp2, str(hf)]) == 0
    shutil.copyfile(small_tokenizer, hf / "tokenizer.model")
    _fails(capsys, ["convert", "from-hf", str(hf), str(tmp_path / "o")], "mismatched tokenizer")
    config = json.loads((hf / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (hf / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["convert", "from-hf", str(hf), str(tmp_path / "o")], "hidden_act")
    # a training run whose tokenizer differs from the start point's
    start = tmp_path / "start"
    assert main(["convert", "consolidate", ckpt_tp2_pp2, str(start)]) == 0
    from loom.launch.checkpoint.start_point import load_start_point

    with pytest.raises(ConvertError, match="tokenizer differs"):
        load_start_point(None, start, tokenizer_sha256="0" * 64)


def test_cli_subprocess_prints_one_line(tmp_path):
    proc = run_loom(["convert", "to-hf", str(tmp_path / "missing"), str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"
    assert "Traceback" not in proc.stdout + proc.stderr
