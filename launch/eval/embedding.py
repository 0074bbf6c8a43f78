"""Embedding-space families of `loom eval`: robustness to nearest-neighbour token substitution and
to an L2 fast-gradient step on the input embeddings, and the geometry of the embedding table."""

from __future__ import annotations

import torch
import torch.distributed as dist

from loom.launch.eval.checkpoint import before_alignment_table
from loom.launch.eval.settings import batches_of
from loom.model.parallel import comm
from loom.techniques.metrics import geometry as geo_m
from loom.techniques.metrics import robustness as rob_m


class EmbeddingPasses:
    """Part of `launch.eval_runner.Evaluator`."""

    def robustness(self) -> None:
        from loom.model.parallel.pipeline import forward_backward_1f1b

        table = self.m.full_embedding_table()
        nn_ids = torch.zeros(self.m.cfg.model.vocab_size, dtype=torch.long)
        if dist.get_rank() == 0:
            nn_ids = rob_m.nearest_neighbours(table)
        comm.broadcast(nn_ids, src=0)
        s, stream = self.seq, self.held.stream
        n = min(self.s.robust_rows, len(stream) // (s + 1))
        rows_all = stream[: n * (s + 1)].reshape(n, s + 1)
        half = s // 2
        module = self.m.module
        for chunk in batches_of(self.mine(n), self.s.batch_size):
            clean = rows_all[chunk]
            pert = clean.copy()
            for r, i in enumerate(chunk):
                ctx, _ = rob_m.substitute_tokens(
                    clean[r, : half + 1].tolist(),
                    nn_ids,
                    self.s.robust_fraction,
                    seed=self.s.seed * 100003 + i,
                    protect=[0],
                )
                pert[r, : half + 1] = ctx
            a, _ = self.m.forward(clean)
            b, _ = self.m.forward(pert)
            # one-step L2 fast-gradient perturbation of the input embeddings
            grads: dict[str, torch.Tensor] = {}

            def keep_grad(out):
                out.retain_grad()
                grads["e"] = out
                return out

            for p in module.parameters():
                p.requires_grad_(True)
            handle = module.embedding.register_forward_hook(lambda m_, i_, o: keep_grad(o)) if module.is_first else None
            tokens = torch.as_tensor(clean, dtype=torch.long, device=self.m.device)
            try:
                forward_backward_1f1b(
                    lambda mb, rec: module(mb, rec, update_ema=False),
                    [tokens],
                    self.m.pp_group,
                    module.carry_specs(tokens.shape[0], s, self.m.dtype),
                    self.m.device,
                )
            finally:
                if handle is not None:
                    handle.remove()
                for p in module.parameters():
                    p.requires_grad_(False)
                    p.grad = None
            delta = None
            if module.is_first:
                e, g = grads["e"].detach(), grads["e"].grad
                adv = rob_m.fgsm_l2(e, g if g is not None else torch.zeros_like(e), self.s.fgsm_eps)
                delta = lambda out, adv=adv: adv  # noqa: E731
            with torch.no_grad():
                c, _ = self.m.forward(clean, embed_delta=delta)
            if a is not None:
                for r, i in enumerate(chunk):
                    self.record(
                        "robust",
                        (
                            i,
                            a["nll"][r, half:].numpy(),
                            b["nll"][r, half:].numpy(),
                            a["argmax"][r, half:].numpy(),
                            b["argmax"][r, half:].numpy(),
                            (a["rank"][r] == 0).numpy(),
                            (c["rank"][r] == 0).numpy(),
                        ),
                    )

    def geometry(self) -> None:
        table = self.m.full_embedding_table()
        if dist.get_rank() != 0 or table is None:
            return
        from loom.techniques.hcma import HCMA

        cfg = self.m.cfg
        hcfg = cfg.techniques.hcma
        hcma = HCMA(hcfg, cfg.model.hidden_size)
        try:
            hcma.refresh(table, 0, table.shape[0])
            fine = hcma._state["assign_fine"]
            coarse = hcma._state["assign_coarse"]
            self.record("geo", ("silhouette_fine", geo_m.silhouette_cosine(table, fine)))
            self.record("geo", ("silhouette_coarse", geo_m.silhouette_cosine(table, coarse)))
        except ValueError as exc:
            self.notes.append(f"geometry: no clustering ({exc})")
        before, self.knn_reference = before_alignment_table(self.s.reference, cfg, self.m.layout.tp)
        if not self.s.reference:
            self.notes.append(
                f"geometry: kNN@{self.s.knn_k} overlap is against {self.knn_reference}: drift from a random init, "
                "not structure kept; pass --set reference=<checkpoint> (loom study uses the same seed's baseline)"
            )
        self.record("geo", ("knn10_overlap", geo_m.knn_overlap(before, table, self.s.knn_k)))
        self.record(
            "geo",
            (
                "low_density_fraction",
                geo_m.low_density_fraction(table, hcfg.knn, hcfg.pi_max, projection=hcma.projection),
            ),
        )
