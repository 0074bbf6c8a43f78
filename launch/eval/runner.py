"""One rank's share of `loom eval`: runs the requested metric families on the evaluation model and
collects per-rank records (turned into metrics on rank 0 by `launch.eval_aggregate`)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Optional

import numpy as np
import torch

from loom.launch.eval.attention import AttentionPass
from loom.launch.eval.data import Heldout, continuation_encoder
from loom.launch.eval.embedding import EmbeddingPasses
from loom.launch.eval.model import EvalModel
from loom.launch.eval.passes import TeacherForcedPasses
from loom.launch.eval.probes import ProbePasses
from loom.launch.eval.settings import DOC_PASS_FAMILIES, HIDDEN_FAMILIES, EvalSettings

log = logging.getLogger(__name__)


class Evaluator(TeacherForcedPasses, AttentionPass, ProbePasses, EmbeddingPasses):
    def __init__(
        self,
        model: EvalModel,
        tokenizer,
        held: Heldout,
        counts: Optional[np.ndarray],
        settings: EvalSettings,
        families: list[str],
    ):
        self.m, self.tok, self.held, self.counts = model, tokenizer, held, counts
        self.s, self.families = settings, families
        self.L = model.cfg.model.num_layers
        self.seq = model.seq_length
        self.dp_rank, self.dp = model.layout.dp_rank, model.layout.dp
        self.encode = continuation_encoder(tokenizer)
        self.records: dict[str, Any] = {}
        self.notes: list[str] = []
        self.rare_gap = settings.rare_gap or min(256, self.seq // 2)
        if self.rare_gap >= self.seq and "rare_recall" in families:
            self.notes.append(
                f"rare_recall: a gap of {self.rare_gap} tokens needs a context longer than seq_length {self.seq}; "
                "no position qualifies (set rare_gap lower to measure a shorter gap)"
            )
        self.knn_reference: Optional[str] = None
        """What the kNN overlap compared with (set by the geometry family on rank 0)."""
        sca_points = model.cfg.techniques.sca.resolved_layers(self.L)
        self.sca_layer = sca_points[0] if sca_points else self.L // 2

    def mine(self, n: int) -> list[int]:
        """Item indices of this data-parallel replica."""
        return [i for i in range(n) if i % self.dp == self.dp_rank]

    def record(self, key: str, value) -> None:
        self.records.setdefault(key, []).append(value)

    def run(self) -> None:
        fam = set(self.families)
        steps = [("loss", self.heldout_loss)]
        if fam & DOC_PASS_FAMILIES:
            steps.append(("document pass", lambda: self.document_pass(capture=bool(fam & HIDDEN_FAMILIES))))
        for name, fn in (
            ("generation", self.generation),
            ("ahd", self.attention),
            ("persistence", self.persistence),
            ("kv_recall", self.kv_recall),
            ("numerical", self.numerical),
            ("multiturn", self.multiturn),
            ("robustness", self.robustness),
            ("geometry", self.geometry),
        ):
            if name in fam:
                steps.append((name, fn))
        for name, fn in steps:
            t0 = time.perf_counter()
            # robustness takes a gradient through the network (FGSM)
            with torch.no_grad() if name != "robustness" else contextlib.nullcontext():
                fn()
            log.info(f"eval: {name} ({time.perf_counter() - t0:.1f} s)")
