"""Every `from loom… import name` in the product resolves — including the imports inside functions, which
only run when their command does (a moved module must not leave a stale lazy import behind)."""

from __future__ import annotations

import ast
import importlib

from tests.architecture.import_graph import REPO, module_files


def _loom_imports():
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("loom."):
                for alias in node.names:
                    yield path, node.lineno, node.module, alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("loom."):
                        yield path, node.lineno, alias.name, None


def test_every_loom_import_resolves():
    problems = []
    for path, line, module, name in _loom_imports():
        where = f"{path.relative_to(REPO)}:{line}"
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"{where}: cannot import {module} ({exc})")
            continue
        if name is None or hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            problems.append(f"{where}: {module} has no {name}")
    assert not problems, "\n".join(problems)
