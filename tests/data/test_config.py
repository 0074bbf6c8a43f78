"""DataConfig: documented fields, OmegaConf structured config, validation messages."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from omegaconf import OmegaConf

from loom.data import config as data_config
from loom.data.config import DataConfig


def test_every_field_has_a_one_line_attribute_docstring():
    tree = ast.parse(inspect.getsource(data_config))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DataConfig")
    documented = {}
    for field, doc in zip(cls.body, cls.body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            documented[field.target.id] = doc.value.value
    names = [f.name for f in dataclasses.fields(DataConfig)]
    assert set(documented) == set(names)
    assert all(text.strip() and "\n" not in text for text in documented.values())


def test_structured_config_round_trips_and_defaults_validate():
    cfg = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["num_workers=2", "on_corrupt=skip", "train_data=/x"]))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, DataConfig) and obj.num_workers == 2 and obj.train_data == "/x"
    assert DataConfig().validate() == []


def test_validate_lists_every_problem_readably():
    problems = DataConfig(
        corpus="wikitext",
        on_corrupt="ignore",
        num_workers=-1,
        val_percent=100.0,
        tokenizer_type="wordpiece",
        train_data=None,
        eval_data="https://host/set/",
    ).validate()
    text = "\n".join(problems)
    for fragment in [
        "'wikitext' is not a built-in corpus",
        "on_corrupt must be one of",
        "num_workers must be >= 0",
        "val_percent must be in [0, 100)",
        "tokenizer_type",
        "ends with '/'",
    ]:
        assert fragment in text
    assert DataConfig(corpus="nope", train_data="/data/shards").validate() == []  # corpus unused then
