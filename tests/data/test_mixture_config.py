"""Data mixtures in the config (YAML, dotted overrides, validation), in data preparation (built-in
corpora sharing one tokenizer, shard sets, held-out sets) and in tokenizer training (input weights)."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import pytest

from loom.data.config import DataConfig, MixtureSource
from loom.data.manifest import load_manifest
from loom.data.tokenizer import Tokenizer, train_tokenizer, weighted_lines
from loom.launch.commands.data import add_commands
from loom.launch.config import ConfigError, load_config
from loom.launch.train.prepare_data import _prepare_on_this_rank
from tests.data.conftest import make_documents, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_mixture_from_yaml_and_from_a_dotted_override():
    cfg = load_config(str(REPO / "configs" / "mixture.yaml"), [], world_size=2, check_files=False)
    assert [(s.path, s.weight) for s in cfg.data.mixture] == [("linuxdoc", 0.75), ("shakespeare", 0.25)]
    cfg = load_config(
        None,
        ["data.mixture=[{path: shakespeare, weight: 2}, {path: /x/code/train/manifest.json, name: code}]"],
        world_size=1,
        check_files=False,
    )
    assert cfg.data.mixture == [
        MixtureSource("shakespeare", 2.0),
        MixtureSource("/x/code/train/manifest.json", name="code"),
    ]
    with pytest.raises(ConfigError, match="wieght"):
        load_config(None, ["data.mixture=[{path: shakespeare, wieght: 2}]"], world_size=1, check_files=False)


def test_validation_names_every_mixture_problem():
    problems = "\n".join(
        DataConfig(
            train_data="/data/set",
            shard_base="pipe:cat /x/",
            mixture=[MixtureSource("linuxdoc", -1.0), MixtureSource(""), MixtureSource("https://h/s/", name="a b")],
            eval_data="/data/val",
            eval_mixture=[MixtureSource("pydoc", 0.0), MixtureSource("/a/pydoc/manifest.json", 0.0)],
        ).validate()
    )
    for fragment in [
        "data.mixture and data.train_data are both set",
        "data.eval_mixture and data.eval_data are both set",
        "give each data.mixture entry its own shard_base",
        "data.mixture[0]: weight must be a finite number >= 0, got -1.0",
        "data.mixture[1]: path is empty",
        "data.mixture[2]: 'https://h/s/' ends with '/'",
        "data.mixture[2]: name 'a b' must be letters",
        "data.eval_mixture: no source has a positive weight",
        "data.eval_mixture: several sources are named pydoc",
    ]:
        assert fragment in problems, fragment
    good = DataConfig(corpus="not-used", mixture=[MixtureSource("shakespeare"), MixtureSource("/d/code/train")])
    assert good.validate() == []


@pytest.mark.parametrize(
    "path,name",
    [
        ("linuxdoc", "linuxdoc"),
        ("/data/code/train/manifest.json", "code"),
        ("/data/prose/", "prose"),
        ("pipe:curl -sf https://host/web-text/manifest.json", "web-text"),
        ("./linuxdoc", "linuxdoc"),
    ],
)
def test_source_names_come_from_the_corpus_or_folder(path, name):
    assert MixtureSource(path).display_name() == name
    assert MixtureSource(path, name="mine").display_name() == "mine"
    assert MixtureSource(path).is_corpus() == (path == "linuxdoc")


@pytest.fixture
def fake_corpora(tmp_path) -> Path:
    """A corpus cache holding small generated stand-ins for the built-in corpora (nothing is downloaded)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for index, name in enumerate(["linuxdoc", "shakespeare", "pydoc"]):
        write_jsonl(cache / f"{name}.jsonl", make_documents(60, seed=100 + index))
    return cache


def prepare(**fields):
    settings = dict(samples_per_shard=8, preprocess_workers=1, eval_corpus=None) | fields
    return _prepare_on_this_rank(DataConfig(**settings), 15, 320)


def test_built_in_corpora_in_a_mixture_share_one_tokenizer(fake_corpora):
    mix = [MixtureSource("linuxdoc", 3.0), MixtureSource("shakespeare", 1.0)]
    prepared = prepare(mixture=mix, cache_dir=str(fake_corpora), val_percent=10.0)
    tokenizer = Path(prepared.tokenizer)
    assert tokenizer.parent.name == "linuxdoc+shakespeare-bpe320-seq15"
    assert [(s.name, s.weight) for s in prepared.mixture] == [("linuxdoc", 3.0), ("shakespeare", 1.0)]
    sha = Tokenizer(tokenizer).sha256
    for source in prepared.mixture + prepared.eval_sources:
        assert load_manifest(source.path).tokenizer_sha256 == sha
    assert [s.name for s in prepared.eval_sources] == ["linuxdoc", "shakespeare"]  # their val splits
    assert all("/val/" in s.path for s in prepared.eval_sources) and prepared.eval == prepared.eval_sources[0].path
    built = tokenizer.stat().st_mtime_ns
    reweighted = prepare(
        mixture=[mix[0], MixtureSource("shakespeare", 9.0)], cache_dir=str(fake_corpora), val_percent=10.0
    )
    assert reweighted.tokenizer == prepared.tokenizer and tokenizer.stat().st_mtime_ns == built  # not retrained
    assert [s.path for s in reweighted.mixture] == [s.path for s in prepared.mixture]
    with_eval = prepare(mixture=mix, cache_dir=str(fake_corpora), eval_corpus="pydoc")
    assert with_eval.eval.startswith(str(tokenizer.parent)) and not with_eval.eval_sources


def test_a_single_corpus_mixture_prepares_what_the_corpus_setting_does(fake_corpora):
    alone = prepare(corpus="shakespeare", cache_dir=str(fake_corpora))
    mixed = prepare(mixture=[MixtureSource("shakespeare", 0.5)], cache_dir=str(fake_corpora))
    assert (mixed.tokenizer, mixed.train) == (alone.tokenizer, alone.train) and not alone.mixture


def test_shard_sets_in_a_mixture_and_several_held_out_sets(fake_corpora, small_shards, other_shards, tmp_path):
    prepared = prepare(
        mixture=[MixtureSource(str(small_shards)), MixtureSource(str(other_shards), 2.0, name="other")],
        eval_mixture=[MixtureSource("pydoc"), MixtureSource(str(small_shards), 2.0, name="seen")],
        cache_dir=str(fake_corpora),
    )
    assert prepared.tokenizer == str(small_shards / "tokenizer.model")  # the first set's tokenizer
    assert [(s.name, s.path) for s in prepared.mixture] == [
        ("small_shards", str(small_shards)),
        ("other", str(other_shards)),
    ]
    assert [(s.name, s.weight) for s in prepared.eval_sources] == [("pydoc", 1.0), ("seen", 2.0)]
    assert load_manifest(prepared.eval_sources[0].path).tokenizer_sha256 == Tokenizer(prepared.tokenizer).sha256
    with pytest.raises(FileNotFoundError, match="data.mixture source 'gone'"):
        prepare(mixture=[MixtureSource(str(tmp_path / "gone"))], cache_dir=str(fake_corpora))


def test_weighted_lines_give_each_input_its_share(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [f"big line {i}" for i in range(40)])
    small = write_jsonl(tmp_path / "small.jsonl", [f"small line {i}" for i in range(10)])
    lines = list(weighted_lines([big, small, tmp_path / "never-read.jsonl"], [1.0, 1.0, 0.0]))
    by_input = Counter(line.split()[0] for line in lines)
    assert by_input == {"big": 25, "small": 25}  # 50 lines in all, half each: the small input repeats
    assert Counter(lines)["small line 3"] in (2, 3) and len(set(lines) & {f"big line {i}" for i in range(40)}) == 25
    assert lines == list(weighted_lines([big, small, tmp_path / "never-read.jsonl"], [1.0, 1.0, 0.0]))  # seeded
    assert Counter(line.split()[0] for line in weighted_lines([big, small], [3, 1])) == {"big": 38, "small": 12}
    with pytest.raises(ValueError, match="2 weights for 3 inputs"):
        list(weighted_lines([big, small, big], [1.0, 1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        list(weighted_lines([big, small], [0.0, 0.0]))


def test_tokenizer_train_on_several_weighted_inputs(tmp_path, corpus_file, capsys):
    other = write_jsonl(tmp_path / "other.jsonl", make_documents(30, seed=11))
    parser = argparse.ArgumentParser(prog="loom")
    add_commands(parser.add_subparsers(dest="command", required=True))
    argv = ["tokenizer", "train", "--input", str(corpus_file), str(other), "--vocab-size", "320", "--threads", "1"]
    args = parser.parse_args([*argv, "--weights", "3", "1", "--out", str(tmp_path / "tok")])
    assert args.func(args) == 0 and "vocab 320" in capsys.readouterr().out
    assert Tokenizer(tmp_path / "tok.model").vocab_size == 320
    args = parser.parse_args([*argv, "--weights", "1", "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="1 weights for 2 inputs"):
        args.func(args)
    plain = train_tokenizer([corpus_file, other], tmp_path / "plain", vocab_size=320, num_threads=1)
    assert Tokenizer(plain).sha256 != Tokenizer(tmp_path / "tok.model").sha256  # the weights shaped the pieces


def test_held_out_sets_and_the_unigram_baseline_of_a_mixture(small_shards, other_shards):
    from loom.launch.train.baselines import unigram_cross_entropy
    from loom.launch.train.run_data import evaluate_sources, mixture_unigram_cross_entropy

    a, b = MixtureSource(str(small_shards)), MixtureSource(str(other_shards))
    alone = unigram_cross_entropy(str(small_shards), str(other_shards), 320)
    assert mixture_unigram_cross_entropy([a], [b], 320) == pytest.approx(alone, rel=1e-12)
    assert mixture_unigram_cross_entropy([a, MixtureSource(str(other_shards), 0.0)], [b], 320) == pytest.approx(alone)
    on_a = mixture_unigram_cross_entropy([a], [a], 320)
    weighted = mixture_unigram_cross_entropy([a], [b, MixtureSource(str(small_shards), 3.0)], 320)
    assert weighted == pytest.approx((alone + 3 * on_a) / 4)

    class Module:
        def evaluate(self, batches):
            loss = sum(batches) / len(batches)
            return {"eval/loss": loss, "eval/perplexity": math.exp(loss)}

    result = evaluate_sources(Module(), {"code": (1.0, [2.0, 4.0]), "prose": (3.0, [5.0])})
    assert result["eval/code/loss"] == 3.0 and result["eval/prose/perplexity"] == pytest.approx(math.exp(5.0))
    assert result["eval/loss"] == pytest.approx((3.0 + 3 * 5.0) / 4)
    assert result["eval/perplexity"] == pytest.approx(math.exp(result["eval/loss"]))
