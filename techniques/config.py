"""Structured (OmegaConf) configuration for the five techniques (docs/techniques.md).

Defaults are docs/techniques.md's. Two index conventions exist because the techniques need two:

* ``lcm.layers`` / ``scr.layers`` select *transformer blocks* by 0-based block index
  (block ``i`` turns ``h^i`` into ``h^{i+1}``). ``"every_k:k"`` selects blocks ``k-1, 2k-1, ...``,
  i.e. every k-th block counting from 1, so ``"every_k:2"`` on 4 layers is ``[1, 3]``.
* CMR sources/targets and SCA layers name *residual-stream states* ``h^l``:
  ``0`` is the embedding output ``h^0`` and ``l = 1..L`` is the output of the l-th block
  (0-based block ``l-1``). ``L`` is the state just before the final norm.

``validate`` methods return human-readable problems instead of raising, so a launcher can report
every problem of a config at once. Options the implementation does not support are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from loom.techniques.cmr_stages import readable_sources, unread_target_warnings
from loom.techniques.selection import (
    layer_selection_problems,
    parse_relevance_noise,
    resolve_layers,
    state_index_problems,
)

_PLACEMENTS = ("post_mlp", "post_attn")


@dataclass
class LCMConfig:
    """Latent Convergence Modulation (docs/techniques.md, LCM)."""

    enabled: bool = False
    """Turn LCM on."""
    layers: str = "all"
    """Blocks to modulate: 'all', 'every_k:<k>' (0-based blocks k-1, 2k-1, ...) or a comma list '0,3,5'."""
    K: int = 16
    """Number of anchor lags."""
    beta: float = 0.8
    """Tap decay: lag j gets weight beta^(j-1) before normalisation."""
    a_max: float = 0.5
    """Upper bound on the modulation strength a; must stay <= 0.5 for a strict contraction."""
    n_iter: int = 1
    """Euler steps toward the anchor (same anchor and gate for every step)."""
    gate: bool = True
    """Use the per-token gate g_t; False means g_t = 1."""
    clamp: bool = True
    """Clamp a at 0 (strict contraction); False lets a range over (-a_max, a_max) to revive dead channels."""
    placement: str = "post_mlp"
    """Where in the block: 'post_mlp' (block output x2) or 'post_attn' (x1, before LN2)."""
    aux_smooth_weight: float = 0.0
    """Weight mu of the smoothness loss mu * mean_t ||h_t - c_t||^2; 0 turns it off."""

    def resolved_layers(self, num_layers: int) -> list[int]:
        """0-based indices of the modulated blocks."""
        return resolve_layers(self.layers, num_layers)

    def validate(self, num_layers: int, *, sequence_shard: int | None = None) -> list[str]:
        """Problems with this config for a model of ``num_layers`` blocks; empty when usable.
        ``sequence_shard`` is the tokens per rank under sequence parallelism (None without it)."""
        problems = layer_selection_problems(self.layers, num_layers)
        if self.K < 1:
            problems.append(f"K={self.K} must be >= 1")
        if not 0.0 < self.beta <= 1.0:
            problems.append(f"beta={self.beta} must be in (0, 1]")
        if not 0.0 < self.a_max <= 0.5:
            problems.append(f"a_max={self.a_max} must be in (0, 0.5]; above 0.5 the update is no longer a contraction")
        if self.n_iter < 1:
            problems.append(f"n_iter={self.n_iter} must be >= 1")
        if self.placement not in _PLACEMENTS:
            problems.append(f"placement={self.placement!r} must be one of {_PLACEMENTS}")
        if self.aux_smooth_weight < 0:
            problems.append(f"aux_smooth_weight={self.aux_smooth_weight} must be >= 0")
        if sequence_shard is not None and sequence_shard < self.K:
            problems.append(
                f"K={self.K} is longer than a sequence-parallel shard of {sequence_shard} tokens: the anchor's "
                "halo would span several shards (use a shorter K, a longer sequence or a smaller parallel.tensor)"
            )
        return problems


@dataclass
class SCRConfig:
    """Structured Context Recomposition (docs/techniques.md, SCR)."""

    enabled: bool = False
    """Turn SCR on."""
    layers: str = "every_k:2"
    """Blocks with SCR: 'all', 'every_k:<k>' (0-based blocks k-1, 2k-1, ...) or a comma list '1,3'."""
    rank: int = 64
    """Rank r of W_p = W_up W_down."""
    gamma: float = 0.5
    """Depth-recursion weight of the relevance rho; 0 makes SCR stage-local (no rho across layers)."""
    decay: float = 1.0
    """Recency decay lambda of the relevance-weighted prefix mean; 1.0 = full-prefix mean."""
    relevance_noise: str = "none"
    """Training-time relevance-logit noise: 'none' or 'concrete(<tau>)' (binary concrete)."""
    placement: str = "post_attn"
    """Where in the block: 'post_attn' (x1, before LN2) or 'post_mlp' (block output x2)."""

    def resolved_layers(self, num_layers: int) -> list[int]:
        """0-based indices of the blocks that host SCR."""
        return resolve_layers(self.layers, num_layers)

    def validate(self, num_layers: int) -> list[str]:
        """Problems with this config for a model of ``num_layers`` blocks; empty when usable."""
        problems = layer_selection_problems(self.layers, num_layers)
        if self.rank < 1:
            problems.append(f"rank={self.rank} must be >= 1")
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"gamma={self.gamma} must be in [0, 1]")
        if not 0.0 < self.decay <= 1.0:
            problems.append(f"decay={self.decay} must be in (0, 1]")
        try:
            parse_relevance_noise(self.relevance_noise)
        except ValueError as exc:
            problems.append(str(exc))
        if self.placement not in _PLACEMENTS:
            problems.append(f"placement={self.placement!r} must be one of {_PLACEMENTS}")
        return problems


@dataclass
class CMRCrossPositionConfig:
    """CMR's optional cross-position mode (attention to captured states of earlier positions); not implemented."""

    window: int = 0
    """Causal window w of captured states each target may attend to; 0 = off."""
    topk: int = 0
    """Number k of highest-gate captured states inside the window; 0 = off."""


@dataclass
class CMRConfig:
    """Contextual Memory Reweaving (docs/techniques.md, CMR). Layer indices name states h^l (0 = embedding)."""

    enabled: bool = False
    """Turn CMR on."""
    source_layers: Optional[List[int]] = None
    """Capture points h^l, l in 1..L; None = [L//4, L//2, 5L//8]. The embedding is added by include_embedding."""
    target_layers: Optional[List[int]] = None
    """Reweave points h^l, l in 1..L (L = just before the final norm); None = [3L//4, L]."""
    rank: int = 128
    """Rank r of the captured latent states."""
    include_embedding: bool = True
    """Also capture the embedding output h^0 (bank slot 0)."""
    rec_loss_weight: float = 0.0
    """Weight of the reconstruction loss L_rec; 0 turns it off."""
    cross_position: CMRCrossPositionConfig = field(default_factory=CMRCrossPositionConfig)
    """Cross-position mode (not implemented: window and topk must be 0)."""
    stage_local: bool = False
    """Restrict each target to the sources its own pipeline stage captures (not the stage's input state), so no
    bank crosses stages; a target left with no source is the identity."""

    def sources(self, num_layers: int) -> list[int]:
        """Sorted source states h^l; bank slot i holds sources(num_layers)[i]."""
        if self.source_layers is None:
            L = num_layers
            chosen = {L // 4, L // 2, 5 * L // 8} - {0}
        else:
            chosen = set(self.source_layers)
        if self.include_embedding:
            chosen.add(0)
        return sorted(chosen)

    def targets(self, num_layers: int) -> list[int]:
        """Sorted target states h^l that get reweaved."""
        if self.target_layers is None:
            return sorted({3 * num_layers // 4, num_layers} - {0})
        return sorted(self.target_layers)

    def slot_of(self, source: int, num_layers: int) -> int:
        """Bank slot that holds the capture of state h^source."""
        return self.sources(num_layers).index(source)

    def available_slots(self, target: int, num_layers: int, pipeline: int = 1) -> list[int]:
        """Bank slots a target h^target may read: sources strictly before it and, when ``stage_local``,
        captured on the target's own stage of a ``pipeline``-stage layout (``techniques.cmr_stages``)."""
        if self.stage_local:
            return readable_sources(self.sources(num_layers), target, num_layers, pipeline)
        return [slot for slot, src in enumerate(self.sources(num_layers)) if src < target]

    def stage_local_warnings(self, num_layers: int, pipeline: int) -> list[str]:
        """Targets that stage-local CMR leaves without a readable source at this pipeline size."""
        if not self.stage_local or pipeline <= 1 or num_layers % pipeline:
            return []
        return unread_target_warnings(self.sources(num_layers), self.targets(num_layers), num_layers, pipeline)

    def validate(self, num_layers: int) -> list[str]:
        """Problems with this config for a model of ``num_layers`` blocks; empty when usable."""
        problems = []
        if self.source_layers is not None:
            problems += state_index_problems("source_layers", list(self.source_layers), 0, num_layers)
            if 0 in self.source_layers and not self.include_embedding:
                problems.append("source_layers contains 0 (the embedding output) but include_embedding is false")
        if self.target_layers is not None:
            problems += state_index_problems("target_layers", list(self.target_layers), 1, num_layers)
        sources, targets = self.sources(num_layers), self.targets(num_layers)
        if not sources:
            problems.append("no source layer to capture")
        if not targets:
            problems.append("no target layer to reweave")
        for target in targets:
            if not any(src < target for src in sources):
                problems.append(f"target h^{target} has no source before it (sources {sources})")
        if targets and sources and max(sources) >= max(targets):
            late = [src for src in sources if src >= max(targets)]
            problems.append(f"sources {late} are at or after the last target h^{max(targets)} and would never be read")
        if self.rank < 1:
            problems.append(f"rank={self.rank} must be >= 1")
        if self.rec_loss_weight < 0:
            problems.append(f"rec_loss_weight={self.rec_loss_weight} must be >= 0")
        if self.cross_position.window != 0 or self.cross_position.topk != 0:
            problems.append("cross_position mode (window/topk > 0) is not implemented; set both to 0")
        return problems


@dataclass
class SCAConfig:
    """Statistical Coherence Alignment (docs/techniques.md, SCA). Layer indices name states h^l."""

    enabled: bool = False
    """Turn SCA on."""
    layers: Optional[List[int]] = None
    """States h^l (1..L) that get an SCA head; None = [L//2]."""
    rank: int = 128
    """Dimension r of the projected, normalised states z."""
    lambda_field: float = 0.02
    """Weight of the field-convergence loss L_field."""
    lambda_coh: float = 0.02
    """Weight of the windowed contrastive coherence loss L_coh."""
    lambda_vc: float = 0.01
    """Weight of the anti-collapse variance/covariance loss L_vc."""
    ema_beta: float = 0.99
    """EMA decay beta of the per-token statistical field."""
    window: int = 64
    """Chunk size W of L_coh; under sequence parallelism it must divide the local sequence length."""
    tau: float = 0.1
    """InfoNCE temperature of L_coh."""
    buffer_sync_every: int = 100
    """Steps between all-reduce averages of the field buffers over data (and SP) ranks."""
    warmup_steps: int = 1000
    """L_field is weighted 0 until this many steps have passed."""
    var_floor_count: int = 0
    """While a token has fewer than this many observations, floor its variance at the prior 1/r; 0 = off."""

    def resolved_layers(self, num_layers: int) -> list[int]:
        """States h^l that host an SCA head."""
        return sorted(self.layers) if self.layers is not None else [num_layers // 2]

    def validate(self, num_layers: int) -> list[str]:
        """Problems with this config for a model of ``num_layers`` blocks; empty when usable."""
        problems = state_index_problems("layers", self.resolved_layers(num_layers), 1, num_layers)
        if self.rank < 2:
            problems.append(f"rank={self.rank} must be >= 2 (the correlation penalty needs two dimensions)")
        for name in ("lambda_field", "lambda_coh", "lambda_vc"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.ema_beta < 1.0:
            problems.append(f"ema_beta={self.ema_beta} must be in [0, 1)")
        if self.window < 2:
            problems.append(f"window={self.window} must be >= 2 (it is split into two halves)")
        if self.tau <= 0:
            problems.append(f"tau={self.tau} must be > 0")
        if self.buffer_sync_every < 1:
            problems.append(f"buffer_sync_every={self.buffer_sync_every} must be >= 1")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.var_floor_count < 0:
            problems.append(f"var_floor_count={self.var_floor_count} must be >= 0")
        return problems


@dataclass
class HCMAOfflineConfig:
    """Step size and length of HCMA's offline (optimizer-free) realignment."""

    eta: float = 0.1
    """Step size eta of each realignment step."""
    iters: int = 10
    """Number T of realignment steps after a refresh."""


@dataclass
class HCMAConfig:
    """Hierarchical Contextual Manifold Alignment on the input embedding table (docs/techniques.md, HCMA)."""

    enabled: bool = False
    """Turn HCMA on."""
    mode: str = "regularizer"
    """'regularizer' (differentiable loss every step) or 'offline' (in-place realignment after each refresh)."""
    refresh_every: int = 500
    """Steps between refreshes of the hierarchy, densities and anchor."""
    K1: int = 64
    """Number of coarse clusters."""
    K2: int = 1024
    """Total number of fine clusters (K2/K1 inside each coarse cluster)."""
    proj_dim: int = 256
    """Random-projection dimension p used for kNN and k-means."""
    knn: int = 16
    """Neighbours of the kNN density estimate."""
    gamma: float = 0.5
    """Exponent of the density weight pi = min(rho_med/rho, pi_max)^gamma."""
    pi_max: float = 4.0
    """Cap on rho_med/rho before the exponent."""
    w: List[float] = field(default_factory=lambda: [0.5, 1.0])
    """Per-level weights [coarse, fine] of the centroid pull."""
    lambda_anchor: float = 1.0
    """Weight lambda_a of the trust-region term toward the table at the last refresh."""
    lambda_hcma: float = 1e-3
    """Total weight lambda_HCMA of the regulariser in the training loss."""
    offline: HCMAOfflineConfig = field(default_factory=HCMAOfflineConfig)
    """Offline-mode step size and iteration count."""
    apply_to_output_embedding: str = "tied"
    """How the output embedding is affected; only 'tied' (through weight tying) is supported."""
    apply_to_hidden_layer: Optional[int] = None
    """Extension aligning hidden states at a layer to the hierarchy; not implemented, must stay None."""
    kmeans_iters: int = 20
    """Iterations of each spherical k-means."""
    seed: int = 1234
    """Seed of the random projection R."""
    kmeans_seed: int = 0
    """Seed of the coarse k-means; fine k-means inside coarse cluster c uses kmeans_seed + c."""
    chunk_rows: int = 4096
    """Rows per chunk of the kNN similarity, the loss and the offline update (bounds their temporaries)."""
    anchor_dtype: str = "float32"
    """Storage dtype of the trust-region anchor: 'float32' or 'bfloat16' (halves its memory)."""

    def validate(self, num_layers: int) -> list[str]:
        """Problems with this config; ``num_layers`` is accepted for a uniform interface."""
        problems = []
        if self.mode not in ("regularizer", "offline"):
            problems.append(f"mode={self.mode!r} must be 'regularizer' or 'offline'")
        for name in ("refresh_every", "K1", "K2", "proj_dim", "knn", "kmeans_iters", "chunk_rows"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.K1 >= 1 and self.K2 >= 1 and (self.K2 < self.K1 or self.K2 % self.K1):
            problems.append(f"K2={self.K2} must be a multiple of K1={self.K1}")
        if self.gamma < 0:
            problems.append(f"gamma={self.gamma} must be >= 0")
        if self.pi_max < 1:
            problems.append(f"pi_max={self.pi_max} must be >= 1")
        if len(self.w) != 2 or any(x < 0 for x in self.w):
            problems.append(f"w={list(self.w)} must be two non-negative weights [coarse, fine]")
        if self.lambda_anchor < 0:
            problems.append(f"lambda_anchor={self.lambda_anchor} must be >= 0")
        if self.lambda_hcma < 0:
            problems.append(f"lambda_hcma={self.lambda_hcma} must be >= 0")
        if self.offline.eta <= 0:
            problems.append(f"offline.eta={self.offline.eta} must be > 0")
        if self.offline.iters < 1:
            problems.append(f"offline.iters={self.offline.iters} must be >= 1")
        if self.apply_to_output_embedding != "tied":
            problems.append(f"apply_to_output_embedding={self.apply_to_output_embedding!r}: only 'tied' is supported")
        if self.apply_to_hidden_layer is not None:
            problems.append("apply_to_hidden_layer is not implemented; leave it null")
        if self.anchor_dtype not in ("float32", "bfloat16"):
            problems.append(f"anchor_dtype={self.anchor_dtype!r} must be 'float32' or 'bfloat16'")
        return problems


@dataclass
class TechniquesConfig:
    """All five techniques; each is off unless its ``enabled`` is set."""

    lcm: LCMConfig = field(default_factory=LCMConfig)
    """Latent Convergence Modulation."""
    scr: SCRConfig = field(default_factory=SCRConfig)
    """Structured Context Recomposition."""
    cmr: CMRConfig = field(default_factory=CMRConfig)
    """Contextual Memory Reweaving."""
    sca: SCAConfig = field(default_factory=SCAConfig)
    """Statistical Coherence Alignment."""
    hcma: HCMAConfig = field(default_factory=HCMAConfig)
    """Hierarchical Contextual Manifold Alignment."""

    def warnings(self, num_layers: int, pipeline: int = 1) -> list[str]:
        """Usable but probably unintended settings of the enabled techniques (``"cmr: ..."``), for a log line."""
        return [f"cmr: {w}" for w in self.cmr.stage_local_warnings(num_layers, pipeline)] if self.cmr.enabled else []

    def validate(self, num_layers: int, *, sequence_shard: int | None = None) -> list[str]:
        """Problems of the enabled techniques, each prefixed with its namespace (``"lcm: ..."``);
        ``sequence_shard`` is the tokens per rank under sequence parallelism (None without it)."""
        problems = []
        if self.lcm.enabled:
            problems += [f"lcm: {p}" for p in self.lcm.validate(num_layers, sequence_shard=sequence_shard)]
        if self.scr.enabled:
            problems += [f"scr: {p}" for p in self.scr.validate(num_layers)]
        if self.cmr.enabled:
            problems += [f"cmr: {p}" for p in self.cmr.validate(num_layers)]
        if self.sca.enabled:
            problems += [f"sca: {p}" for p in self.sca.validate(num_layers)]
        if self.hcma.enabled:
            problems += [f"hcma: {p}" for p in self.hcma.validate(num_layers)]
        return problems
