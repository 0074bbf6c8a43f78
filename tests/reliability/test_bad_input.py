"""Bad input ends with one clear line and a non-zero exit — never a raw traceback from inside a
library, never a half-written output directory."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.data.manifest import load_manifest
from loom.launch.commands.config_docs import iter_fields
from loom.launch.config import ConfigError, RunConfig, load_config
from tests.e2e.runner import REPO, TINY, loom_env

KEYS = [path for path, _, _, _, is_section in iter_fields(RunConfig) if not is_section]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 50), max_size=4),
)
KEYISH = st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=20))


def _config_error_or_valid_config(entries: dict) -> None:
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v!r}" for k, v in entries.items()]
    try:
        cfg = load_config(TINY, overrides, world_size=2, check_files=False)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p and "\n" not in p for p in exc.problems)
        return
    assert isinstance(cfg, RunConfig)


RANDOM_OVERRIDES = st.dictionaries(KEYISH, VALUES, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RANDOM_OVERRIDES)
def test_random_configs_give_a_config_error_or_a_valid_config(tmp_path_factory, entries):
    _config_error_or_valid_config(entries)


@pytest.mark.slow  # the README's 300 sets; the quick loop tries 40
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RANDOM_OVERRIDES)
def test_300_random_configs_give_a_config_error_or_a_valid_config(tmp_path_factory, entries):
    _config_error_or_valid_config(entries)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_as_a_config_file(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("cfg") / "random.yaml"
    path.write_bytes(blob)
    try:
        load_config(str(path), [], check_files=False)
    except ConfigError as exc:
        assert exc.problems


def _loom(*args, cwd=REPO, env=None):
    return subprocess.run(
        [sys.executable, "-m", "loom.launch.cli", *args],
        cwd=cwd,
        env=loom_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def _assert_one_clear_error(name: str, proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0, f"{name}: exit code 0"
    assert "Traceback" not in proc.stderr, f"{name}: raw traceback\n{proc.stderr[-2000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "loom: error", "usage:"))]
    assert errors, f"{name}: no error line in\n{proc.stderr[-1000:]}"
    return errors


# every case runs in a folder of its own (its working directory, so a relative default output_dir such as
# tiny.yaml's runs/tiny lands there too), next to the inputs it names: a text file and a file that is not a
# SentencePiece model. Nothing may appear in that folder.
CASES = [
    ("missing config", ["train", "configs/does-not-exist.yaml", "output_dir={tmp}/run"]),
    ("unknown subcommand", ["trian", TINY, "output_dir={tmp}/run"]),
    ("missing argument", ["train"]),
    ("bad override", ["train", TINY, "output_dir={tmp}/run", "optim.lr"]),
    ("unknown key", ["train", TINY, "output_dir={tmp}/run", "optim.lrr=3"]),
    ("missing shards", ["train", TINY, "output_dir={tmp}/run", "data.train_data=/no/such/manifest.json"]),
    ("shards folder without a manifest", ["train", TINY, "output_dir={tmp}/run", "data.train_data={tmp}"]),
    (
        "missing tokenizer input",
        ["tokenizer", "train", "--input", "/no/such/*.txt", "--vocab-size", "500", "--out", "{tmp}/tok"],
    ),
    (
        "unknown corpus",
        ["preprocess", "--corpus", "wikitext", "--tokenizer", "{tmp}/t.model", "--out", "{tmp}/s", "--seq-length", "8"],
    ),
    (
        "tokenizer is not a SentencePiece model",
        ["preprocess", "--input", "{tmp}/input.txt", "--tokenizer", "{tmp}/README.model", "--out", "{tmp}/s"]
        + ["--seq-length", "8"],
    ),
    ("unreadable checkpoint", ["train", TINY, "output_dir={tmp}/run", "checkpoint.resume={tmp}"]),
]


SLOW_CASES = {"shards folder without a manifest", "unreadable checkpoint"}  # they reach the run's set-up


@pytest.mark.parametrize(
    "name,args",
    [pytest.param(*c, marks=[pytest.mark.slow] if c[0] in SLOW_CASES else []) for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, name, args):
    (tmp_path / "input.txt").write_text("A document of plain text.\n")
    (tmp_path / "README.model").write_text("# not a SentencePiece model\n")
    before = _tree(tmp_path)
    proc = _loom(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    _assert_one_clear_error(name, proc)
    assert _tree(tmp_path) == before, f"{name}: wrote into its folder"


@pytest.fixture(scope="module")
def tiny_shards() -> Path:
    """The tiny config's own training shards (prepared once, cached like every run's)."""
    from loom.launch.config import load_config
    from loom.launch.train.prepare_data import _prepare_on_this_rank

    cfg = load_config(TINY, [], world_size=1, check_files=False)
    prepared = _prepare_on_this_rank(cfg.data, cfg.model.seq_length, cfg.model.vocab_size)
    return Path(prepared.train).parent


@pytest.mark.slow  # starts a training run: set-up passes, the first shard read fails
@pytest.mark.parametrize("manifest", ["original", "rehashed"])
def test_shards_of_random_bytes_under_a_valid_manifest_fail_before_training(tmp_path, tiny_shards, manifest):
    """The shards are replaced by random bytes of the same sizes. With the original manifest the sha256
    check names the first shard read; with a manifest rehashed to match the random bytes, the tar/sample
    count check does. Either way: one error line, no step trained, no checkpoint."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    data = json.loads((shards / "manifest.json").read_text())
    for shard in data["shards"]:
        blob = os.urandom(shard["nbytes"])
        (shards / shard["name"]).write_bytes(blob)
        if manifest == "rehashed":
            shard["sha256"] = hashlib.sha256(blob).hexdigest()
    (shards / "manifest.json").write_text(json.dumps(data))
    load_manifest(shards)  # the manifest itself is valid

    run = tmp_path / "run"
    proc = _loom("train", TINY, f"output_dir={run}", f"data.train_data={shards}", "data.num_workers=1")
    errors = _assert_one_clear_error(manifest, proc)
    why = "sha256 differs from the manifest" if manifest == "original" else "unreadable tar after 0 samples"
    assert len(errors) == 1 and re.fullmatch(rf"error: corrupt shard shard-\d+\.tar: {why}.*", errors[0]), errors
    assert "step 1/" not in proc.stdout
    assert not (run / "checkpoints").exists()
