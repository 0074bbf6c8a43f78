"""HCMA: pull the directions of input-embedding rows toward a density-weighted cluster hierarchy.

docs/techniques.md, HCMA. A periodic, non-differentiable refresh builds a two-level spherical k-means
hierarchy on a random projection of the unit-normalised table, a kNN density weight ``pi`` per
row, full-space centroids and a trust-region anchor. Between refreshes either a differentiable
regulariser (``loss``) or an optimizer-free realignment (``offline_align``) uses them.

The table is vocab-parallel: each TP rank holds a shard of rows, the last shard(s) ending in
padding rows that must not take part. The refresh all-gathers the projected rows, so every rank
clusters the same global view (k-means runs on the group's first rank and is broadcast, so the
assignments are bit-identical); the loss is local to the shard and normalised by the *global*
number of real rows, so the losses of the TP ranks sum to the single-rank loss.

At ``V = 128k``, ``d = 4096`` a plain autograd loss would keep several ``V x d`` fp32
temporaries alive. The loss is therefore a custom autograd function that streams over row
chunks in both passes and saves nothing but references to the table and the refresh state.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loom.model.parallel import comm
from loom.model.precision import at_least_fp32
from loom.techniques.config import HCMAConfig

_STATE_TENSORS = ("assign_coarse", "assign_fine", "pi", "centroids_coarse", "centroids_fine", "anchor")


def spherical_kmeans(points: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means on unit rows, initialised from ``k`` rows drawn with a CPU generator seeded ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.randperm(points.shape[0], generator=generator)[:k].to(points.device)
    centroids = points[pick].clone()
    assign = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    for _ in range(iters):
        assign = (points @ centroids.T).argmax(1)
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, points), dim=-1)
    return assign, centroids


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _gradient_wrt_unit_rows(E, pi, w, centroids, assigns, anchor, lambda_anchor):
    """Per-row gradient of ``L_HCMA``: of each row's own summand ``sum_l w_l pi ||E - mu_l||^2 + lambda_a ||E - E0||^2``
    w.r.t. that row of ``E`` (the loss's mean over rows scales it by ``1 / V``)."""
    grad = lambda_anchor * (E - anchor)
    for weight, cent, assign in zip(w, centroids, assigns):
        grad = grad + (weight * pi)[:, None] * (E - cent[assign])
    return 2.0 * grad


class _RegulariserLoss(torch.autograd.Function):
    """Chunked ``L_HCMA`` of the real rows of one shard; backward goes through ``normalize``."""

    @staticmethod
    def forward(ctx, weight_real, hcma: "HCMA"):
        state, cfg, n_global = hcma._state, hcma.cfg, hcma._state["num_real_global"]
        terms = torch.zeros(3, dtype=torch.promote_types(weight_real.dtype, torch.float32), device=weight_real.device)
        for rows in hcma._row_chunks(weight_real.shape[0]):
            E = F.normalize(at_least_fp32(weight_real[rows]), dim=-1)
            pi = state["pi"][rows]
            for level, (cent, assign) in enumerate(hcma._levels(rows)):
                terms[level] += cfg.w[level] * ((E - cent[assign]).pow(2).sum(-1) * pi).sum()
            terms[2] += cfg.lambda_anchor * (E - state["anchor"][rows].to(E.dtype)).pow(2).sum()
        terms /= n_global
        ctx.mark_non_differentiable(terms)
        ctx.hcma = hcma
        ctx.save_for_backward(weight_real)
        return terms.sum(), terms

    @staticmethod
    def backward(ctx, grad_total, _grad_terms):
        (weight_real,) = ctx.saved_tensors
        hcma = ctx.hcma
        state, cfg = hcma._state, hcma.cfg
        scale = at_least_fp32(grad_total) / state["num_real_global"]
        grad = torch.empty_like(weight_real)
        for rows in hcma._row_chunks(weight_real.shape[0]):
            W = at_least_fp32(weight_real[rows])
            norm = W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            E = W / norm
            levels = list(zip(*hcma._levels(rows)))
            g_E = scale * _gradient_wrt_unit_rows(
                E, state["pi"][rows], cfg.w, levels[0], levels[1], state["anchor"][rows].to(E.dtype), cfg.lambda_anchor
            )
            grad[rows] = ((g_E - (g_E * E).sum(-1, keepdim=True) * E) / norm).to(grad.dtype)
        return grad, None


class HCMA:
    """Refresh state and losses of HCMA for one (possibly TP-sharded) input embedding table.

    Not an ``nn.Module``: it owns no parameters, and its state must not be cast to bf16 or
    treated as model weights. Checkpoint it with ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, cfg: HCMAConfig, hidden_size: int):
        self.cfg = cfg
        self.hidden_size = hidden_size
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        # torch.randn's draw, written so ZeRO-3's zero.Init cannot change it: there constructors default to
        # the GPU (a CPU generator cannot draw there) and round to the run's half dtype; `.float()` and
        # `normal_` are not intercepted, so every layout and device gets the same fp32 projection
        projection = torch.empty(hidden_size, cfg.proj_dim, device="cpu").float().normal_(generator=generator)
        self.projection = projection / math.sqrt(cfg.proj_dim)
        self._state: Optional[dict[str, Any]] = None
        self._stats: dict[str, float] = {}
        self._last: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ refresh
    @property
    def ready(self) -> bool:
        """Whether a refresh (or a loaded state) is available."""
        return self._state is not None

    def due(self, step: int) -> bool:
        """Whether ``step`` is a refresh step (step 0 and every ``refresh_every`` steps)."""
        return step % self.cfg.refresh_every == 0

    @torch.no_grad()
    def refresh(
        self,
        weight_local: torch.Tensor,
        vocab_start: int,
        num_real_rows_local: int,
        tp_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        """Rebuild hierarchy, densities and anchor from the table (every TP rank calls it together).

        ``weight_local`` is this rank's ``[rows, d]`` shard starting at global row ``vocab_start``;
        its first ``num_real_rows_local`` rows are real tokens, the rest padding.
        """
        cfg, device = self.cfg, weight_local.device
        n_local = int(num_real_rows_local)
        if not 0 <= n_local <= weight_local.shape[0]:
            raise ValueError(f"num_real_rows_local={n_local} outside 0..{weight_local.shape[0]}")
        E = F.normalize(at_least_fp32(weight_local[:n_local]), dim=-1)
        Y = F.normalize(E @ self.projection.to(device=device, dtype=E.dtype), dim=-1)
        layout = self._layout(weight_local.shape[0], vocab_start, n_local, tp_group, device)
        Y_all = self._gather_real(Y, layout, tp_group)
        n_global = Y_all.shape[0]
        if n_global <= cfg.knn or n_global < cfg.K1:
            raise ValueError(f"HCMA needs more real rows ({n_global}) than knn={cfg.knn} and at least K1={cfg.K1}")

        rho = self._knn_density(Y, Y_all, layout["offset"])
        rho_all = self._gather_real(rho[:, None], layout, tp_group)[:, 0]
        ratio = rho_all.median() / rho  # lower median, as torch.median
        pi = ratio.clamp(max=cfg.pi_max) ** cfg.gamma

        assign_coarse, assign_fine = self._hierarchy(Y_all, tp_group)
        mine = slice(layout["offset"], layout["offset"] + n_local)
        centroids = []
        for assign, k in ((assign_coarse, cfg.K1), (assign_fine, cfg.K2)):
            sums = torch.zeros(k, E.shape[1], dtype=E.dtype, device=device).index_add_(0, assign[mine], E)
            if _group_size(tp_group) > 1:
                comm.all_reduce(sums, group=tp_group)
            centroids.append(F.normalize(sums, dim=-1))

        anchor_dtype = torch.bfloat16 if cfg.anchor_dtype == "bfloat16" else E.dtype
        self._state = {
            "assign_coarse": assign_coarse[mine].clone(),
            "assign_fine": assign_fine[mine].clone(),
            "pi": pi,
            "centroids_coarse": centroids[0],
            "centroids_fine": centroids[1],
            "anchor": E.to(anchor_dtype),
            "num_real_global": n_global,
            "num_real_local": n_local,
            "vocab_start": int(vocab_start),
        }
        self._stats = self._cluster_stats(assign_coarse, assign_fine, rho_all)

    def _layout(self, rows: int, vocab_start: int, n_local: int, group, device) -> dict[str, Any]:
        """Where each rank's real rows go in the global (vocab-ordered, padding-free) view."""
        if _group_size(group) == 1:
            return {"offset": 0, "rows": rows, "ranks": [(0, n_local)]}
        meta = torch.tensor([vocab_start, n_local, rows], dtype=torch.long, device=device)
        metas = [m.tolist() for m in comm.all_gather(meta, group=group)]
        if len({m[2] for m in metas}) != 1:
            raise ValueError(f"vocab shards must have equal row counts, got {[m[2] for m in metas]}")
        order = sorted(range(len(metas)), key=lambda r: metas[r][0])
        me = dist.get_rank(group)
        offset = sum(metas[r][1] for r in order[: order.index(me)])
        return {"offset": offset, "rows": rows, "ranks": [(r, metas[r][1]) for r in order]}

    @staticmethod
    def _gather_real(x: torch.Tensor, layout: dict[str, Any], group) -> torch.Tensor:
        """Concatenate the real rows ``x [n_local, k]`` of all ranks in vocabulary order."""
        if _group_size(group) == 1:
            return x
        padded = x.new_zeros(layout["rows"], x.shape[1])
        padded[: x.shape[0]] = x
        parts = comm.all_gather(padded, group=group)
        return torch.cat([parts[rank][:count] for rank, count in layout["ranks"]])

    def _knn_density(self, Y: torch.Tensor, Y_all: torch.Tensor, offset: int) -> torch.Tensor:
        """``rho_v = 1 / max(mean cosine distance to the k nearest other rows, 1e-6)`` for the local rows."""
        rho = torch.empty(Y.shape[0], dtype=Y.dtype, device=Y.device)
        for rows in self._row_chunks(Y.shape[0]):
            sim = Y[rows] @ Y_all.T
            local = torch.arange(sim.shape[0], device=Y.device)
            sim[local, offset + rows.start + local] = -2.0  # exclude self
            distance = 1.0 - sim.topk(self.cfg.knn, dim=1).values
            rho[rows] = 1.0 / distance.mean(1).clamp_min(1e-6)
        return rho

    def _hierarchy(self, Y_all: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse and nested fine assignments of all real rows, computed once and broadcast."""
        cfg = self.cfg
        coarse = torch.zeros(Y_all.shape[0], dtype=torch.long, device=Y_all.device)
        fine = torch.zeros_like(coarse)
        if _group_size(group) == 1 or dist.get_rank(group) == 0:
            coarse, _ = spherical_kmeans(Y_all, cfg.K1, cfg.kmeans_iters, cfg.kmeans_seed)
            per_coarse = cfg.K2 // cfg.K1
            for c in range(cfg.K1):
                members = (coarse == c).nonzero().squeeze(1)
                if members.numel() == 0:
                    continue
                sub, _ = spherical_kmeans(
                    Y_all[members], min(per_coarse, members.numel()), cfg.kmeans_iters, cfg.kmeans_seed + c
                )
                fine[members] = c * per_coarse + sub
        if _group_size(group) > 1:
            src = dist.get_global_rank(group, 0)
            comm.broadcast(coarse, src=src, group=group)
            comm.broadcast(fine, src=src, group=group)
        return coarse, fine

    def _cluster_stats(self, coarse: torch.Tensor, fine: torch.Tensor, rho_all: torch.Tensor) -> dict[str, float]:
        stats = {}
        for name, assign, k in (("coarse", coarse, self.cfg.K1), ("fine", fine, self.cfg.K2)):
            sizes = torch.bincount(assign, minlength=k).float()
            occupied = sizes[sizes > 0]
            stats.update(
                {
                    f"{name}_size_min": occupied.min().item(),
                    f"{name}_size_max": occupied.max().item(),
                    f"{name}_size_mean": occupied.mean().item(),
                    f"{name}_empty": float((sizes == 0).sum()),
                }
            )
        stats["frac_low_density"] = (rho_all < rho_all.median() / self.cfg.pi_max).float().mean().item()
        return stats

    # ------------------------------------------------------------------ losses
    def _row_chunks(self, n: int):
        step = self.cfg.chunk_rows
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _levels(self, rows: slice):
        state = self._state
        return (
            (state["centroids_coarse"], state["assign_coarse"][rows]),
            (state["centroids_fine"], state["assign_fine"][rows]),
        )

    def _require_state(self, weight_local: torch.Tensor) -> None:
        if self._state is None:
            raise RuntimeError("HCMA has no refresh state: call refresh() (or load_state_dict()) first")
        n_local = self._state["num_real_local"]
        if weight_local.shape[0] < n_local or weight_local.shape[1] != self.hidden_size:
            raise ValueError(
                f"weight shard {tuple(weight_local.shape)} does not match the refresh "
                f"({n_local} real rows, hidden size {self.hidden_size})"
            )
        for name in _STATE_TENSORS:
            if self._state[name].device != weight_local.device:
                self._state[name] = self._state[name].to(weight_local.device)

    def loss(self, weight_local: torch.Tensor) -> torch.Tensor:
        """Unweighted ``L_HCMA`` of this shard's real rows, normalised by the global real-row count.

        Differentiable w.r.t. ``weight_local``; the training loss gets ``cfg.lambda_hcma`` times it
        (see ``weighted_loss``).
        """
        self._require_state(weight_local)
        total, terms = _RegulariserLoss.apply(weight_local[: self._state["num_real_local"]], self)
        self._last = {
            "l_coarse": terms[0].detach(),
            "l_fine": terms[1].detach(),
            "l_anchor": terms[2].detach(),
            "loss": total.detach(),
        }
        return total

    def weighted_loss(self, weight_local: torch.Tensor) -> torch.Tensor:
        """``lambda_hcma * L_HCMA``: the term to attach to the embedding output in regulariser mode."""
        return self.cfg.lambda_hcma * self.loss(weight_local)

    @torch.no_grad()
    def offline_align(self, weight_local: torch.Tensor) -> torch.Tensor:
        """HCMA's offline step: new values for the shard. Starting from the refresh, ``T = offline.iters``
        gradient steps on the unit rows ``Ê ← Ê − η ∇_Ê L_HCMA(Ê)`` (``η = offline.eta``) with the centroids,
        assignments, ``π`` and anchor held fixed, then the original norms re-applied,
        ``E_v ← ‖E_v‖ · Ê_v / ‖Ê_v‖``. Padding rows are returned unchanged.

        ``∇`` is the per-row gradient: the gradient of row ``v``'s own summand,
        ``2 Σ_l w_l π_v (Ê_v − μ^(l)_{a_l(v)}) + 2 λ_a (Ê_v − Ê⁰_v)``, i.e. ``V`` times the gradient of the
        mean over rows, whose ``1/V`` would make the step vanish at real vocabulary sizes. Writing the
        result into the fp32 master and the working copy (``set_full_fp32_param``) is the caller's job.
        """
        self._require_state(weight_local)
        cfg, state = self.cfg, self._state
        new = weight_local.detach().clone()
        for rows in self._row_chunks(state["num_real_local"]):
            W = at_least_fp32(new[rows])
            norm = W.norm(dim=-1, keepdim=True)
            E = W / norm.clamp_min(1e-12)
            levels = list(zip(*self._levels(rows)))
            anchor, pi = state["anchor"][rows].to(W.dtype), state["pi"][rows]
            for _ in range(cfg.offline.iters):
                E = E - cfg.offline.eta * _gradient_wrt_unit_rows(
                    E, pi, cfg.w, levels[0], levels[1], anchor, cfg.lambda_anchor
                )
            new[rows] = (norm * F.normalize(E, dim=-1)).to(new.dtype)
        return new

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Refresh state of this rank's shard (tensors and ints); empty before the first refresh."""
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (an empty one clears the state)."""
        if not state:
            self._state = None
            return
        missing = [k for k in (*_STATE_TENSORS, "num_real_global", "num_real_local", "vocab_start") if k not in state]
        if missing:
            raise KeyError(f"HCMA state is missing {missing}")
        self._state = {k: (v.clone() if isinstance(v, torch.Tensor) else int(v)) for k, v in state.items()}

    @torch.no_grad()
    def broadcast_state(self, group: Optional[dist.ProcessGroup]) -> None:
        """Copy the group's first rank's refresh state to the other ranks (e.g. data-parallel replicas
        holding the same shard), so every replica pulls toward bit-identical targets."""
        if _group_size(group) == 1 or self._state is None:
            return
        src = dist.get_global_rank(group, 0)
        for name in _STATE_TENSORS:
            comm.broadcast(self._state[name], src=src, group=group)

    def metrics(self) -> dict[str, Any]:
        """Cluster statistics of the last refresh (floats) and loss terms of the last ``loss`` (0-dim tensors)."""
        return {**self._stats, **self._last}
