"""Parsing the techniques' config values: block selections (``"all"``, ``"every_k:k"``, ``"0,3,5"``),
residual-stream state indices, and the relevance-noise spec. Used by `techniques.config` to validate
and by the model to resolve where each technique sits."""

from __future__ import annotations

import re
from typing import List, Optional

_CONCRETE = re.compile(r"^concrete\(\s*([-+0-9.eE]+)\s*\)$")


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """Turn a block selection (``"all"``, ``"every_k:k"``, ``"0,3,5"``) into sorted 0-based block indices."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    text = str(spec).strip().replace(" ", "")
    if text == "all":
        return list(range(num_layers))
    if text.startswith("every_k"):
        match = re.fullmatch(r"every_k[:=](\d+)", text)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"layer selection {spec!r}: expected 'every_k:<k>' with an integer k >= 1")
        k = int(match.group(1))
        return list(range(k - 1, num_layers, k))
    if not text:
        raise ValueError("layer selection is empty: use 'all', 'every_k:<k>' or a comma list like '0,3,5'")
    try:
        layers = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(
            f"layer selection {spec!r}: expected 'all', 'every_k:<k>' or a comma list of block indices like '0,3,5'"
        ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer selection {spec!r}: block indices {bad} are outside 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer selection {spec!r} repeats a block index")
    return sorted(layers)


def parse_relevance_noise(spec: str) -> Optional[float]:
    """``"none"`` -> None; ``"concrete(t)"`` -> temperature ``t``; anything else raises ValueError."""
    text = str(spec).strip().replace(" ", "")
    if text == "none":
        return None
    match = _CONCRETE.fullmatch(text)
    if match is None:
        raise ValueError(f"relevance_noise {spec!r}: expected 'none' or 'concrete(<tau>)'")
    try:
        tau = float(match.group(1))
    except ValueError:
        raise ValueError(f"relevance_noise {spec!r}: temperature is not a number") from None
    if tau <= 0:
        raise ValueError(f"relevance_noise {spec!r}: temperature must be > 0")
    return tau


def layer_selection_problems(spec: str, num_layers: int) -> list[str]:
    try:
        layers = resolve_layers(spec, num_layers)
    except ValueError as exc:
        return [str(exc)]
    return [] if layers else [f"layers={spec!r} selects no block out of {num_layers}"]


def state_index_problems(what: str, indices: List[int], lo: int, num_layers: int) -> list[str]:
    problems = []
    bad = [i for i in indices if not lo <= i <= num_layers]
    if bad:
        problems.append(
            f"{what} {bad} are outside {lo}..{num_layers} (h^0 = embedding output, h^l = output of block l)"
        )
    if len(set(indices)) != len(indices):
        problems.append(f"{what} {list(indices)} repeat an index")
    return problems
