"""The architecture holds: no import cycles, the import rules of docs/architecture.md, small modules,
DeepSpeed internals behind one adapter, and the package list in setup.cfg equal to the folders."""

from __future__ import annotations

import ast
import configparser

from tests.architecture.import_graph import REPO, cycles, graph, module_files

LEAVES = {"loom.model.parallel.comm", "loom.model.parallel.zero_state", "loom.model.precision"}
"""Modules that import only torch (and DeepSpeed): every package may use them."""
MAX_LINES = 400


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def _violations(rule) -> list[str]:
    return [f"{src} imports {dst}" for src, targets in graph().items() for dst in sorted(targets) if rule(src, dst)]


def test_only_launch_imports_launch():
    bad = _violations(lambda s, d: not s.startswith("loom.launch") and d.startswith("loom.launch"))
    assert not bad, bad


def test_techniques_and_data_stand_alone():
    """techniques/ and data/ import neither each other nor model/, except model's leaf modules."""

    def rule(src: str, dst: str) -> bool:
        for pkg, other in (("loom.techniques", "loom.data"), ("loom.data", "loom.techniques")):
            if src.startswith(pkg) and (dst.startswith(other) or (dst.startswith("loom.model") and dst not in LEAVES)):
                return True
        return False

    bad = _violations(rule)
    assert not bad, bad


def test_leaf_modules_import_nothing_of_loom():
    bad = _violations(lambda s, d: s in LEAVES)
    assert not bad, bad


def test_only_the_cli_imports_command_wiring():
    bad = _violations(
        lambda s, d: d.startswith("loom.launch.commands") and not (s == "loom.launch.cli" or s.startswith(d))
    )
    assert not bad, bad


def test_modules_stay_small():
    big = {m: n for m, p in module_files().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by purpose): {big}"


def _deepspeed_internal_uses() -> list[str]:
    from loom.model.parallel.zero_state import INTERNALS

    adapter = REPO / "model" / "parallel" / "zero_state.py"
    uses = []
    for path in module_files().values():
        if path == adapter:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    name = node.args[1].value
            if name in INTERNALS:
                uses.append(f"{path.relative_to(REPO)}:{node.lineno} uses DeepSpeed's {name}")
    return uses


def test_deepspeed_internals_only_in_the_adapter():
    uses = _deepspeed_internal_uses()
    assert not uses, "go through loom.model.parallel.zero_state: " + "; ".join(uses)


def test_setup_cfg_lists_every_package():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    on_disk = {m for m, p in module_files().items() if p.name == "__init__.py"}
    assert listed == on_disk, (
        f"setup.cfg [options] packages differ: missing {on_disk - listed}, extra {listed - on_disk}"
    )
