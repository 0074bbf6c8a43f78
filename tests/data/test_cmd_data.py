"""`loom data|tokenizer|preprocess` subcommands, through argparse as the CLI wires them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from loom.data.manifest import load_manifest
from loom.launch.commands.data import add_commands

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loom")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokenizer_train_then_preprocess(tmp_path, corpus_file, capsys):
    assert (
        run(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus_file),
                "--vocab-size",
                "320",
                "--out",
                str(tmp_path / "tok" / "t"),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "tok" / "t.model").is_file() and "vocab 320" in capsys.readouterr().out
    assert (
        run(
            [
                "preprocess",
                "--input",
                str(corpus_file),
                "--tokenizer",
                str(tmp_path / "tok" / "t.model"),
                "--out",
                str(tmp_path / "sh"),
                "--seq-length",
                "31",
                "--samples-per-shard",
                "16",
                "--val-percent",
                "20",
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    assert load_manifest(tmp_path / "sh" / "train").seq_length == 31


def test_bad_input_raises_one_line_errors(tmp_path, tokenizer_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(
            [
                "preprocess",
                "--input",
                str(tmp_path / "missing.jsonl"),
                "--tokenizer",
                str(tokenizer_model),
                "--out",
                str(tmp_path / "o"),
                "--seq-length",
                "8",
                "--quiet",
            ]
        )
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no documents found"):
        run(
            [
                "preprocess",
                "--input",
                str(tmp_path / "empty.jsonl"),
                "--tokenizer",
                str(tokenizer_model),
                "--out",
                str(tmp_path / "o"),
                "--seq-length",
                "8",
                "--quiet",
            ]
        )
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        run(["data", "prepare", "nope", "--cache-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown corpus"):
        run(["tokenizer", "train", "--corpus", "nope", "--out", str(tmp_path / "t"), "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: --corpus and --input are exclusive, one is required
        run(["preprocess", "--tokenizer", "x", "--out", "y", "--seq-length", "8"])


def _preprocess_args(inputs: str, tokenizer: str, out: str) -> list[str]:
    return ["preprocess", "--input", inputs, "--tokenizer", tokenizer, "--out", out, "--seq-length", "8", "--quiet"]


def test_a_tokenizer_that_is_not_a_sentencepiece_model(tmp_path, corpus_file):
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("this is a README, not a SentencePiece model\n")
    with pytest.raises(ValueError, match=r"is not a SentencePiece model \(.*could not parse"):
        run(_preprocess_args(str(corpus_file), str(not_a_model), str(tmp_path / "o")))
    # the inputs are checked first: a missing input is reported, not the bad tokenizer
    with pytest.raises(FileNotFoundError, match="missing.jsonl' does not exist"):
        run(_preprocess_args(str(tmp_path / "missing.jsonl"), str(not_a_model), str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="tokenizer model .* does not exist"):
        run(_preprocess_args(str(corpus_file), str(tmp_path / "absent.model"), str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_preprocess_errors_are_one_line_in_a_fresh_process(tmp_path, corpus_file):
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("not a model\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom.launch.cli",
            *_preprocess_args(str(corpus_file), str(not_a_model), str(tmp_path / "o")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer model"), done.stderr
    assert not (tmp_path / "o").exists()


def test_data_list_in_a_fresh_process(tmp_path):
    code = (
        "import argparse, sys; from loom.launch.commands.data import add_commands; p = argparse.ArgumentParser(); "
        "add_commands(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "data", "list", "--cache-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in ("linuxdoc", "pydoc", "shakespeare"):
        assert name in done.stdout
    assert "GPL-2.0" in done.stdout and str(tmp_path) in done.stdout
