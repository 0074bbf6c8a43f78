"""Field docstrings of the config dataclasses, read from their source, and the generated reference.

Attribute docstrings (a string literal right after a field) are the single place a field is
documented; `docs/config.md` is rendered from them and a test keeps it in sync.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, fields, is_dataclass
from functools import lru_cache


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_name(tp) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def iter_fields(cls, prefix: str = ""):
    """(dotted path, type name, default, doc, is_section) for every field, depth first."""
    docs = field_docs(cls)
    for f in fields(cls):
        default = _default(f)
        path = prefix + f.name
        if is_dataclass(default):
            yield path, type(default).__name__, None, docs.get(f.name, ""), True
            yield from iter_fields(type(default), path + ".")
        else:
            yield path, _type_name(f.type), default, docs.get(f.name, ""), False


def render_markdown(cls) -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses' field docstrings by `loom config docs`; "
        "a test keeps it in sync. Override any field on the command line with `key.path=value`.",
        "",
    ]
    for path, type_name, default, doc, is_section in iter_fields(cls):
        if is_section:
            lines += ["", f"## `{path}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        else:
            shown = "null" if default is None else repr(default)
            lines.append(f"| `{path}` | {type_name} | `{shown}` | {doc} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
