"""Config loading, overrides and one clear error per problem."""

import subprocess
import sys

import pytest

from loom.launch.commands.config_docs import field_docs, iter_fields, render_markdown
from loom.launch.config import ConfigError, RunConfig, load_config

TINY = "configs/tiny.yaml"


def _problems(*overrides, world_size=None, path=TINY):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), world_size=world_size, check_files=False)
    return info.value.problems


def test_yaml_and_overrides_merge():
    cfg = load_config(TINY, ["optim.lr=0.01", "parallel.tensor=2", "techniques.lcm.enabled=true"], check_files=False)
    assert cfg.optim.lr == 0.01 and cfg.parallel.tensor == 2 and cfg.techniques.lcm.enabled
    assert cfg.model.hidden_size == 64  # from the YAML


def test_unknown_key_suggests_the_right_one():
    (problem,) = _problems("optim.lrr=1")
    assert "unknown key 'optim.lrr'" in problem and "did you mean 'optim.lr'" in problem


def test_unknown_nested_section():
    (problem,) = _problems("techniques.lcn.enabled=true")
    assert "techniques.lcn.enabled" in problem and "did you mean" in problem


def test_wrong_type():
    (problem,) = _problems("model.hidden_size=wide")
    assert "'model.hidden_size'" in problem and "int" in problem


@pytest.mark.parametrize(
    "overrides,world,needle",
    [
        (["parallel.tensor=2", "parallel.pipeline=2"], 6, "world size 6 is not divisible"),
        (["parallel.tensor=3", "model.num_kv_heads=null"], None, "num_heads 4 is not divisible by parallel.tensor 3"),
        (["parallel.pipeline=3"], None, "num_layers 4 is not divisible by parallel.pipeline 3"),
        (["parallel.zero_stage=3", "parallel.pipeline=2"], None, "ZeRO-3 with parallel.pipeline > 1"),
        (["parallel.zero_stage=3", "train.compile=true"], None, "train.compile needs zero_stage 0, 1 or 2"),
        (["model.hidden_size=0"], None, "model.hidden_size must be positive"),
        (["train.micro_batch_size=-1"], None, "train.micro_batch_size must be positive"),
        (["parallel.zero_stage=5"], None, "zero_stage must be 0, 1, 2 or 3"),
        (["train.precision=fp16"], None, "fp16 is not supported"),
        (["parallel.virtual_stages=0"], None, "parallel.virtual_stages must be positive, got 0"),
        (["parallel.virtual_stages=2"], None, "parallel.virtual_stages 2 needs parallel.pipeline > 1"),
        (
            ["parallel.virtual_stages=2", "parallel.pipeline=2", "parallel.microbatches=3"],
            None,
            "needs parallel.microbatches (3) to be a multiple of parallel.pipeline (2)",
        ),
        (
            ["parallel.virtual_stages=4", "parallel.pipeline=2", "parallel.microbatches=2"],
            None,
            "model.num_layers 4 is not divisible by parallel.pipeline × parallel.virtual_stages = 2 × 4",
        ),
        (
            ["parallel.virtual_stages=2", "parallel.pipeline=2", "parallel.zero_stage=3", "parallel.microbatches=2"],
            None,
            "ZeRO-3 with parallel.pipeline > 1",
        ),
    ],
)
def test_each_bad_config_has_its_own_message(overrides, world, needle):
    problems = _problems(*overrides, world_size=world)
    assert any(needle in p for p in problems), problems


def test_interleaved_pipeline_is_a_valid_layout():
    overrides = ["parallel.virtual_stages=2", "parallel.pipeline=2", "parallel.microbatches=4"]
    assert load_config(TINY, overrides, world_size=2, check_files=False).parallel.virtual_stages == 2


def test_missing_files_are_reported():
    with pytest.raises(ConfigError) as info:
        load_config(
            TINY,
            [
                "checkpoint.resume=/nonexistent/ckpt",
                "deepspeed_json=/nope.json",
                "data.train_data=/no/shards",
                "data.tokenizer=/no/tok.model",
            ],
        )
    text = "\n".join(info.value.problems)
    for path in ("/nonexistent/ckpt", "/nope.json", "/no/shards", "/no/tok.model"):
        assert path in text


def test_missing_config_file():
    assert "config file not found" in _problems(path="configs/nope.yaml")[0]


def test_several_problems_are_all_reported():
    assert len(_problems("optim.lrr=1", "model.hidden_size=x", "train.max_stepz=3")) == 3


def test_every_field_has_a_docstring():
    undocumented = [path for path, _, _, doc, _ in iter_fields(RunConfig) if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert field_docs(RunConfig)["output_dir"]


def test_generated_docs_are_in_sync():
    with open("docs/config.md") as f:
        assert f.read() == render_markdown(RunConfig), "docs/config.md is stale: run `loom config docs`"


def _loom(*args):
    return subprocess.run([sys.executable, "-m", "loom.launch.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_config_show_and_errors():
    ok = _loom("config", "show", TINY, "optim.lr=0.5")
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.5" in ok.stdout
    bad = _loom("config", "show", TINY, "optim.lrr=1", "parallel.pipeline=3")
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in bad.stderr
    helped = _loom("--help")
    assert helped.returncode == 0
    for command in ("train", "config", "data", "tokenizer", "preprocess", "eval", "convert", "bench"):
        assert command in helped.stdout
