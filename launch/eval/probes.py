"""Generation and recall probes of `loom eval`: greedy generations (EV, LI, lexical statistics),
key-value recall against length, and numerical-reasoning probes."""

from __future__ import annotations

import random
import time

import numpy as np

from loom.launch.eval.data import non_content_positions
from loom.launch.eval.settings import batches_of, parse_lengths
from loom.techniques.metrics import recall as rec_m


class ProbePasses:
    """Part of `launch.eval_runner.Evaluator`."""

    def generation(self) -> None:
        docs, P = self.held.docs, self.s.gen_prompt_tokens
        eos = self.tok.eos_id
        n = min(self.s.gen_prompts, len(docs))
        mine = self.mine(n)
        if not mine:
            return
        prompts, perturbed = [], []
        for i in mine:
            body = docs[i][:P].tolist()
            prompts.append([eos] + body)
            cands = non_content_positions(body, self.tok) or list(range(len(body)))
            drop = random.Random(f"li-{self.s.seed}-{i}").choice(cands)
            perturbed.append([eos] + body[:drop] + body[drop + 1 :])
        t0 = time.perf_counter()
        ids, ents = self.m.generate(prompts, self.s.gen_tokens, limit=self.seq)
        elapsed = time.perf_counter() - t0
        ids_p, _ = self.m.generate(perturbed, self.s.gen_tokens, limit=self.seq)
        if self.m.reports_stats:
            for r, i in enumerate(mine):
                self.record(
                    "gen", (i, ids[r].tolist(), ents[r].tolist(), ids_p[r].tolist(), self.tok.decode(ids[r].tolist()))
                )
            self.record("gen_ms", (elapsed * 1000.0, len(mine) * self.s.gen_tokens))

    def kv_recall(self) -> None:
        eos = self.tok.eos_id
        for n in parse_lengths(self.s.kv_lengths, self.seq):
            try:
                probes = rec_m.make_kv_probes(
                    self.held.filler, self.held.words, self.encode, n, self.s.kv_samples, self.s.kv_facts, self.s.seed
                )
            except ValueError as exc:
                self.notes.append(f"kv_recall N={n}: {exc}")
                continue
            for chunk in batches_of(self.mine(len(probes)), self.s.batch_size):
                ps = [probes[i] for i in chunk]
                width = max(len(p.answer) for p in ps)
                rows = [[eos] + p.context + p.answer + [eos] * (width - len(p.answer)) for p in ps]
                t0 = time.perf_counter()
                stats, _ = self.m.forward(np.asarray(rows))
                ms = (time.perf_counter() - t0) * 1000.0
                gen, _ = self.m.generate([[eos] + p.context for p in ps], width, limit=None)
                if stats is not None:
                    c = len(ps[0].context)
                    for r, (i, p) in enumerate(zip(chunk, ps)):
                        pred = stats["argmax"][r, c : c + len(p.answer)].tolist()
                        self.record(
                            "kv",
                            (
                                n,
                                i,
                                rec_m.exact_match(gen[r].tolist(), p.answer),
                                rec_m.teacher_forced_accuracy(pred, p.answer),
                            ),
                        )
                    self.record("kv_ms", (n, ms, len(rows) * (len(rows[0]) - 1)))

    def numerical(self) -> None:
        eos = self.tok.eos_id
        for n in parse_lengths(self.s.num_lengths, self.seq):
            try:
                probes = rec_m.make_numeric_probes(self.held.filler, self.encode, n, self.s.num_samples, self.s.seed)
            except ValueError as exc:
                self.notes.append(f"numerical N={n}: {exc}")
                continue
            for chunk in batches_of(self.mine(len(probes)), self.s.batch_size):
                ps = [probes[i] for i in chunk]
                ga, _ = self.m.generate([[eos] + p.context_a for p in ps], 5, limit=None)
                gb, _ = self.m.generate([[eos] + p.context_b for p in ps], 5, limit=None)
                if self.m.reports_stats:
                    for r, (i, p) in enumerate(zip(chunk, ps)):
                        self.record(
                            "num",
                            (
                                n,
                                i,
                                rec_m.parse_answer(self.tok.decode(ga[r].tolist())),
                                rec_m.parse_answer(self.tok.decode(gb[r].tolist())),
                                p.answer,
                            ),
                        )
