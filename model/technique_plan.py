"""Where each technique sits in the network, resolved once from the config.

Layer numbering follows docs/techniques.md: h^0 is the embedding output and h^ℓ (ℓ = 1..L) the output of
block ℓ. Loom's blocks are 0-based, so block i produces h^(i+1). LCM and SCR select blocks by their
0-based index; CMR sources/targets and SCA heads name residual-stream points h^ℓ.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.techniques.cmr_stages import captured_on_stage
from loom.techniques.config import TechniquesConfig
from loom.techniques.selection import resolve_layers


@dataclass(frozen=True)
class TechniquePlan:
    num_layers: int
    lcm_blocks: frozenset[int]
    scr_blocks: tuple[int, ...]
    cmr_sources: tuple[int, ...]
    cmr_targets: tuple[int, ...]
    cmr_stage_local: bool
    sca_points: tuple[int, ...]

    @staticmethod
    def from_config(tech: TechniquesConfig, num_layers: int) -> "TechniquePlan":
        lcm = frozenset(resolve_layers(tech.lcm.layers, num_layers)) if tech.lcm.enabled else frozenset()
        scr = tuple(sorted(resolve_layers(tech.scr.layers, num_layers))) if tech.scr.enabled else ()
        sources = tuple(sorted(tech.cmr.sources(num_layers))) if tech.cmr.enabled else ()
        targets = tuple(sorted(tech.cmr.targets(num_layers))) if tech.cmr.enabled else ()
        sca = tuple(sorted(tech.sca.resolved_layers(num_layers))) if tech.sca.enabled else ()
        return TechniquePlan(num_layers, lcm, scr, sources, targets, tech.cmr.stage_local, sca)

    def slots_before(self, point: int, stage_first_point: int | None = None) -> list[int]:
        """Bank slots a CMR target at h^point may read: sources strictly below it and, when a stage's input
        state h^stage_first_point is given (stage-local CMR), captured on that stage itself: its input was
        captured, if at all, on the previous stage, so it is never read (`captured_on_stage`). Empty means
        the target's reweave is skipped."""
        return [
            slot
            for slot, src in enumerate(self.cmr_sources)
            if src < point and (stage_first_point is None or captured_on_stage(src, stage_first_point))
        ]

    def carries_rho(self, tech: TechniquesConfig) -> bool:
        return len(self.scr_blocks) > 1 and tech.scr.gamma > 0

    def carries_bank(self) -> bool:
        return bool(self.cmr_sources) and bool(self.cmr_targets) and not self.cmr_stage_local
