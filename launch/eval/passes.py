"""Teacher-forced passes of `loom eval`: the held-out loss, the document pass (per-token
statistics and, on request, hidden-state summaries), and the context gains (persistence, multi-turn)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from loom.launch.eval.data import split_docs
from loom.launch.eval.settings import batches_of
from loom.techniques.metrics import perplexity as ppl_m
from loom.techniques.metrics import recall as rec_m
from loom.techniques.metrics import representation as rep_m


class TeacherForcedPasses:
    """Part of `launch.eval_runner.Evaluator`."""

    def heldout_loss(self) -> None:
        stream, s = self.held.stream, self.seq
        n = min(self.s.heldout_samples, len(stream) // (s + 1))
        samples = stream[: n * (s + 1)].reshape(n, s + 1)
        total = np.zeros(2)
        for chunk in batches_of(self.mine(n), self.s.batch_size):
            stats, _ = self.m.forward(samples[chunk])
            if stats is not None:
                total += [float(stats["nll"].double().sum()), stats["nll"].numel()]
        if self.m.reports_stats:
            self.record("loss", total.tolist())

    def document_pass(self, capture: bool) -> None:
        s = self.seq
        stride = self.s.doc_stride or max(1, s // 2)
        eos = self.tok.eos_id
        items = []
        for d in self.mine(len(self.held.docs)):
            z = np.concatenate([[eos], self.held.docs[d]])
            for start, keep in ppl_m.plan_windows(len(z) - 1, s, stride):
                items.append((d, start, keep))
        per_doc: dict[int, dict[str, list]] = {}
        hidden: dict[tuple[int, int], list] = {}
        t0, n_tokens = time.perf_counter(), 0
        for chunk in batches_of(items, self.s.batch_size):
            rows = []
            for d, start, _ in chunk:
                z = np.concatenate([[eos], self.held.docs[d]])
                rows.append(z[start : start + s + 1])
            stats, captured = self.m.forward(np.stack(rows), capture=capture)
            n_tokens += len(rows) * s
            for r, (d, _start, keep) in enumerate(chunk):
                if stats is not None:
                    rec = per_doc.setdefault(
                        d, {k: [] for k in ("nll", "entropy", "rank", "rank_cos", "argmax", "target", "gap", "input")}
                    )
                    for key in ("nll", "entropy", "rank", "rank_cos", "argmax"):
                        rec[key].append(stats[key][r, keep:].numpy())
                    rec["target"].append(rows[r][1 + keep :])
                    rec["input"].append(rows[r][keep:-1])
                    rec["gap"].append(rec_m.long_gap_mask(rows[r], self.rare_gap)[keep:])
                for point, h in captured.items():
                    hidden.setdefault((d, point), []).append(h[r, keep:].cpu())
        elapsed = time.perf_counter() - t0
        if self.m.reports_stats:
            self.record("tf_ms_per_token", (elapsed * 1000.0, n_tokens))
            for d, rec in per_doc.items():
                self.record("doc", (d, {k: np.concatenate(v) for k, v in rec.items()}))
        if capture and self.m.reports_hidden:
            self._summarise_hidden(hidden)

    def _summarise_hidden(self, hidden: dict) -> None:
        eos = self.tok.eos_id
        n_docs = max(1, len(self.held.docs))
        per_doc_rows = max(2, self.s.erank_tokens // n_docs)
        rare_cut = self.s.rare_max_frequency
        for (d, point), parts in hidden.items():
            h = torch.cat(parts).double()  # [N, d]: input positions 0..N-1 of z = [EOS] + doc
            tokens = np.concatenate([[eos], self.held.docs[d]])[: h.shape[0]]
            h_doc, tok_doc = h[1:], tokens[1:]  # drop the EOS position
            out: dict[str, Any] = {"repvar": rep_m.representation_variability(h_doc)}
            if point == self.L:
                start = torch.zeros(h_doc.shape[0], dtype=torch.bool)
                start[0] = True
                out["drift"] = rep_m.latent_drift(h_doc, start)
                if self.counts is not None:
                    freq = rec_m.frequency_of(tok_doc, self.counts)
                    rare = np.flatnonzero(freq <= rare_cut)
                    out["rare_states"] = (tok_doc[rare].tolist(), h_doc[rare].float())
            if point in (self.sca_layer, self.L):
                out["chunks"] = rep_m.chunk_means(h_doc, self.s.coh_chunk).float()
            pick = np.linspace(0, h_doc.shape[0] - 1, num=min(per_doc_rows, h_doc.shape[0])).astype(int)
            out["sample"] = h_doc[pick].float()
            self.record("hidden", (d, point, out))

    def persistence(self) -> None:
        eos = self.tok.eos_id
        for mult in [float(x) for x in self.s.persistence_multiples.split(",") if x.strip()]:
            n = int(mult * self.seq) // 2 * 2
            docs = [d for d in self.held.docs if len(d) >= n]
            if not docs:
                self.notes.append(f"persistence: no document has {n} tokens")
                continue
            for chunk in batches_of(self.mine(len(docs)), self.s.batch_size):
                full = np.stack([np.concatenate([[eos], docs[i][:n]]) for i in chunk])
                half = np.stack([np.concatenate([[eos], docs[i][n // 2 : n]]) for i in chunk])
                a, _ = self.m.forward(full)
                b, _ = self.m.forward(half)
                if a is not None:
                    for r, i in enumerate(chunk):
                        self.record("persist", (mult, i, b["nll"][r].numpy(), a["nll"][r, n // 2 :].numpy()))

    def multiturn(self) -> None:
        eos, T = self.tok.eos_id, self.s.turn_tokens
        newline = next((i for i in range(self.tok.vocab_size) if self.tok.id_to_piece(i) == "<0x0A>"), None)
        if newline is None:
            self.notes.append("multiturn: the tokenizer has no newline byte piece")
            return
        # turns: paragraphs (split at blank lines) of at least T tokens, cut to T; dialogues are
        # runs of consecutive turns inside one document of the stream
        # turns: consecutive paragraphs (split at blank lines) accumulated until they hold T-2 tokens,
        # cut there and closed by a blank line, so every turn has exactly T tokens; a dialogue is a run
        # of consecutive turns inside one document
        runs: list[list[np.ndarray]] = []
        for doc in split_docs(self.held.stream, eos, complete_tail=True):
            nl = doc == newline
            breaks = np.flatnonzero(nl[:-1] & nl[1:])
            turns, buffer, prev = [], [], 0
            for bpos in list(breaks) + [len(doc)]:
                para = doc[prev:bpos]
                prev = bpos + 2
                while len(para) and para[0] == newline:
                    para = para[1:]
                while len(para) and para[-1] == newline:
                    para = para[:-1]
                if not len(para):
                    continue
                buffer = list(buffer) + ([newline, newline] if buffer else []) + para.tolist()
                if len(buffer) >= T - 2:
                    turns.append(np.asarray(buffer[: T - 2] + [newline, newline], dtype=np.int64))
                    buffer = []
            if turns:
                runs.append(turns)
        for k in [int(x) for x in self.s.multiturn_ks.split(",") if x.strip()]:
            dialogues = []
            for run in runs:
                for start in range(0, len(run) - k + 1, k):
                    dialogues.append(run[start : start + k])
            dialogues = dialogues[: self.s.multiturn_dialogues]
            if not dialogues:
                self.notes.append(f"multiturn: no {k}-turn dialogue of {T}-token turns in the held-out text")
                continue
            for chunk in batches_of(self.mine(len(dialogues)), self.s.batch_size):
                full = np.stack([np.concatenate([[eos]] + dialogues[i]) for i in chunk])
                last = np.stack([np.concatenate([[eos], dialogues[i][-2], dialogues[i][-1]]) for i in chunk])
                a, _ = self.m.forward(full)
                b, _ = self.m.forward(last)
                if a is not None:
                    for r, i in enumerate(chunk):
                        self.record("turns", (k, i, b["nll"][r, -T:].numpy(), a["nll"][r, -T:].numpy()))
