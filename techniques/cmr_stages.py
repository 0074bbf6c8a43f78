"""Which CMR sources a pipeline stage can read when CMR is stage-local (no bank crosses stages).

A stage's blocks produce the states after its input ``h^first``; the input itself is the previous stage's
output and is captured (if it is a source) over there, so it is not readable on this stage. The one
exception is the embedding output ``h^0``, which the first stage captures itself. A target left with no
readable source is the identity (its reweave is skipped); `loom` reports it as a config warning.
"""

from __future__ import annotations


def captured_on_stage(source: int, stage_first_point: int) -> bool:
    """Whether the pipeline stage whose input is ``h^stage_first_point`` captures the source ``h^source``."""
    return source > stage_first_point or source == stage_first_point == 0


def stage_first_point(point: int, num_layers: int, pipeline: int) -> int:
    """The input state ``h^first`` of the stage (of ``pipeline`` equal stages) whose blocks produce ``h^point``."""
    per_stage = num_layers // pipeline
    return (point - 1) // per_stage * per_stage


def readable_sources(sources: list[int], target: int, num_layers: int, pipeline: int) -> list[int]:
    """Bank slots (indices into ``sources``) the stage-local target ``h^target`` reads at this pipeline size."""
    first = stage_first_point(target, num_layers, pipeline)
    return [slot for slot, src in enumerate(sources) if src < target and captured_on_stage(src, first)]


def unread_target_warnings(sources: list[int], targets: list[int], num_layers: int, pipeline: int) -> list[str]:
    """One line per target that reads no source at this pipeline size."""
    out = []
    for target in targets:
        if not readable_sources(sources, target, num_layers, pipeline):
            first = stage_first_point(target, num_layers, pipeline)
            out.append(
                f"stage_local: target h^{target} reads no source at pipeline {pipeline} (its stage captures "
                f"h^{first + 1}..h^{first + num_layers // pipeline}, the sources are {sources}), so its reweave "
                "is skipped (identity); move a source into that stage or turn stage_local off"
            )
    return out
