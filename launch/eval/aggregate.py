"""Rank 0 of `loom eval`: every rank's records turned into the metrics, with the pure functions of
`techniques.metrics`, plus the training-time metrics read from the run's TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loom.launch.train.tensorboard import GRAD_NORM_EVERY_STEP
from loom.techniques.metrics import attention as attn_m
from loom.techniques.metrics import entropy as ent_m
from loom.techniques.metrics import geometry as geo_m
from loom.techniques.metrics import lexical as lex_m
from loom.techniques.metrics import optimization as opt_m
from loom.techniques.metrics import perplexity as ppl_m
from loom.techniques.metrics import recall as rec_m
from loom.techniques.metrics import representation as rep_m
from loom.techniques.metrics import robustness as rob_m


def aggregate(records: list[dict], ev, run_logs: dict) -> dict[str, float]:
    """Rank 0: the metrics from every rank's records (`ev` is rank 0's `Evaluator`)."""
    merged: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            merged.setdefault(k, []).extend(v)
    fam = set(ev.families)
    out: dict[str, float] = {}
    for section in (
        _loss_metrics,
        _document_metrics,
        _hidden_state_metrics,
        _generation_metrics,
        _attention_metrics,
        _gain_metrics,
        _probe_metrics,
        _embedding_metrics,
    ):
        section(merged, ev, fam, out)
    _run_log_metrics(run_logs, ev, fam, out)
    return out


def _nanmean(values) -> float:
    return lex_m.nanmean(list(values))


def _loss_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    if merged.get("loss"):
        tot = np.sum(np.asarray(merged["loss"]), axis=0)
        nll = ppl_m.mean_nll(tot[0], int(tot[1]))
        out["loss/heldout_nll"] = nll
        out["loss/perplexity"] = ppl_m.perplexity(nll)
        out["loss/tokens"] = float(tot[1])


def _document_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    s, counts = ev.s, ev.counts
    docs = dict(sorted(merged.get("doc", []), key=lambda x: x[0]))
    if docs:
        nlls = [torch.as_tensor(d["nll"]) for d in docs.values()]
        if "ppl_f" in fam:
            w = min(s.ppl_window, max(2, min(len(x) for x in nlls) // 2))
            st = max(1, min(s.ppl_stride, w // 2))
            r = ppl_m.ppl_fluctuation(nlls, w, st)
            out.update(
                {
                    "ppl_f/ppl_f": r["ppl_f"],
                    "ppl_f/ppl_cv": r["ppl_cv"],
                    "ppl_f/documents": r["documents"],
                    "ppl_f/window": w,
                }
            )
        if "entropy" in fam:
            r = ent_m.sequence_entropy_stats([torch.as_tensor(d["entropy"]) for d in docs.values()])
            out.update(
                {"entropy/hbar_mean": r["mean"], "entropy/hbar_var": r["var"], "entropy/sequences": r["sequences"]}
            )
        target = np.concatenate([d["target"] for d in docs.values()])
        ranks = np.concatenate([d["rank"] for d in docs.values()])
        ranks_cos = np.concatenate([d["rank_cos"] for d in docs.values()])
        gap = np.concatenate([d["gap"] for d in docs.values()])
        if counts is not None:
            freq = rec_m.frequency_of(target, counts)
            if "rare_recall" in fam:
                res = rec_m.accuracy_by_bucket(ranks, freq, (1, 5), mask=gap)
                out["rare_recall/gap"] = ev.rare_gap
                for bucket, row in res.items():
                    for k, v in row.items():
                        out[f"rare_recall/{bucket}/{k}"] = v
            if "retrieval" in fam:
                for name, rk, mask in (("logit", ranks, None), ("cosine", ranks_cos, None), ("gap", ranks, gap)):
                    res = geo_m.retrieval_at_k(rk, freq, (1, 10), mask=mask)
                    for bucket, row in res.items():
                        for k, v in row.items():
                            out[f"retrieval/{name}/{bucket}/{k}"] = v
            if "rare_words" in fam:
                nll_all = np.concatenate([d["nll"] for d in docs.values()])
                r = ppl_m.restricted_nll(torch.as_tensor(nll_all), torch.as_tensor(freq), s.rare_max_frequency)
                out["rare_words/nll_rare"] = r["nll"]
                out["rare_words/rare_targets"] = r["tokens"]
        else:
            ev.notes.append("no training-token counts: frequency-bucket metrics skipped")
        if "overhead" in fam and merged.get("tf_ms_per_token"):
            ms = np.sum(np.asarray(merged["tf_ms_per_token"]), axis=0)
            out["overhead/inference_ms_per_token"] = ms[0] / max(ms[1], 1)


def _hidden_state_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    s, counts, L = ev.s, ev.counts, ev.L
    hidden: dict[tuple, dict] = {(d, p): v for d, p, v in merged.get("hidden", [])}
    if hidden:
        points = sorted({p for _, p in hidden})
        if "repvar" in fam:
            for p in points:
                out[f"repvar/layer{p}"] = _nanmean(v["repvar"] for (d, q), v in hidden.items() if q == p)
            out["repvar/mean"] = _nanmean(out[f"repvar/layer{p}"] for p in points if p > 0)
        if "drift" in fam:
            out["drift/latent_drift"] = _nanmean(v["drift"] for (d, q), v in hidden.items() if q == L)
        pooled = {p: torch.cat([v["sample"] for (d, q), v in sorted(hidden.items()) if q == p]) for p in points}
        aniso = {p: rep_m.anisotropy(pooled[p], s.anisotropy_pairs, s.seed) for p in points}
        if "collapse" in fam:
            for p in points:
                out[f"collapse/erank_layer{p}"] = rep_m.effective_rank(pooled[p][: s.erank_tokens])
                out[f"collapse/anisotropy_layer{p}"] = aniso[p]
            out["collapse/erank_last"] = out[f"collapse/erank_layer{L}"]
            out["collapse/anisotropy_last"] = aniso[L]
        if "coherence" in fam:
            for p, name in ((ev.sca_layer, "sca_layer"), (L, "last")):
                keys = [(d, q) for (d, q), v in sorted(hidden.items()) if q == p and "chunks" in v]
                r = rep_m.coherence_report(
                    [hidden[k]["chunks"] for k in keys], groups=[ev.held.doc_source[d] for d, _ in keys]
                )
                for k, v in r.items():
                    out[f"coherence/{name}/{k}"] = v
            out["coherence/sca_layer_index"] = ev.sca_layer
        if "rare_words" in fam and counts is not None:
            toks, states, docs_of = [], [], []
            for (d, q), v in sorted(hidden.items()):
                if q == L and "rare_states" in v:
                    t, h = v["rare_states"]
                    toks += t
                    states.append(h)
                    docs_of += [ev.held.doc_source[d]] * len(t)
            if states:
                r = rep_m.self_consistency(torch.cat(states), toks, docs_of, aniso[L])
                out["rare_words/same_token_cos"] = r["same_token_cos"]
                out["rare_words/self_consistency"] = r["self_consistency"]
                out["rare_words/consistency_tokens"] = r["tokens"]


def _generation_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    if merged.get("gen"):
        gens = sorted(merged["gen"], key=lambda g: g[0])
        out["generation/ev"] = ent_m.entropy_variance([torch.tensor(g[2]) for g in gens])
        out["generation/li"] = _nanmean(lex_m.lexical_instability(g[1], g[3]) for g in gens)
        out["generation/rep4"] = _nanmean(lex_m.rep_n(g[1], 4) for g in gens)
        out["generation/distinct2"] = _nanmean(lex_m.distinct_n(g[1], 2) for g in gens)
        out["generation/sentence_len_std"] = _nanmean(lex_m.sentence_length_std(g[4]) for g in gens)
        out["generation/mean_entropy"] = float(np.mean([np.mean(g[2]) for g in gens]))
        ms = np.sum(np.asarray(merged["gen_ms"]), axis=0)
        out["generation/ms_per_token"] = ms[0] / max(ms[1], 1)
        out["generation/prompts"] = len(gens)


def _attention_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    if merged.get("attn"):
        by_layer: dict[int, dict[int, torch.Tensor]] = {}
        disp: dict[int, list] = {}
        for i, layer, mean, dsum, count in merged["attn"]:
            by_layer.setdefault(layer, {})[i] = mean
            disp.setdefault(layer, []).append((dsum, count))
        layers = sorted(by_layer)
        rows = sorted(by_layer[layers[0]])
        maps = [torch.stack([by_layer[ly][i] for i in rows]) for ly in layers]
        ahd = attn_m.cross_layer_ahd(maps)
        for ly, v in zip(layers[:-1], ahd):
            out[f"ahd/layer{ly}"] = v
        out["ahd/mean"] = float(np.mean(ahd)) if ahd else float("nan")
        for ly in layers:
            tot = np.sum(np.asarray(disp[ly]), axis=0)
            out[f"ahd/dispersion_layer{ly}"] = tot[0] / max(tot[1], 1)
        out["ahd/dispersion_mean"] = float(np.mean([out[f"ahd/dispersion_layer{ly}"] for ly in layers]))


def _gain_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    def gains(records, gain_key, count_key):
        """NLL gain per setting over records (setting, _, NLL with less context, NLL with more context)."""
        for setting in sorted({r[0] for r in records}):
            sel = [r for r in records if r[0] == setting]
            out[gain_key(setting)] = ppl_m.nll_gain(
                np.concatenate([r[2] for r in sel]), np.concatenate([r[3] for r in sel])
            )
            out[count_key(setting)] = len(sel)

    gains(merged.get("persist") or [], lambda m: f"persistence/gain_{m:g}x", lambda m: f"persistence/segments_{m:g}x")
    gains(merged.get("turns") or [], lambda k: f"multiturn/k{k}/gain", lambda k: f"multiturn/k{k}/dialogues")


def _probe_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    if merged.get("kv"):
        for n in sorted({k[0] for k in merged["kv"]}):
            sel = [k for k in merged["kv"] if k[0] == n]
            out[f"kv_recall/N{n}/exact_match"] = float(np.mean([k[2] for k in sel]))
            out[f"kv_recall/N{n}/teacher_forced"] = float(np.mean([k[3] for k in sel]))
            out[f"kv_recall/N{n}/samples"] = len(sel)
            ms = np.sum(np.asarray([(m[1], m[2]) for m in merged.get("kv_ms", []) if m[0] == n]), axis=0)
            out[f"kv_recall/N{n}/ms_per_token"] = ms[0] / max(ms[1], 1)
        out["kv_recall/exact_match_mean"] = _nanmean(v for k, v in out.items() if k.endswith("/exact_match"))
        out["kv_recall/teacher_forced_mean"] = _nanmean(
            v for k, v in out.items() if k.startswith("kv_recall/N") and k.endswith("/teacher_forced")
        )

    if merged.get("num"):
        for n in sorted({x[0] for x in merged["num"]}):
            sel = sorted([x for x in merged["num"] if x[0] == n], key=lambda x: x[1])
            r = rec_m.numeric_scores([x[2] for x in sel], [x[3] for x in sel], [x[4] for x in sel])
            out[f"numerical/N{n}/accuracy"] = r["accuracy"]
            out[f"numerical/N{n}/consistency"] = r["consistency"]
            out[f"numerical/N{n}/samples"] = r["samples"]


def _embedding_metrics(merged: dict, ev, fam: set, out: dict) -> None:
    if merged.get("robust"):
        rb = sorted(merged["robust"], key=lambda x: x[0])
        out["robustness/token_delta_nll"] = rob_m.delta_nll(
            np.concatenate([x[1] for x in rb]), np.concatenate([x[2] for x in rb])
        )
        out["robustness/token_top1_agreement"] = rob_m.top1_agreement(
            np.concatenate([x[3] for x in rb]), np.concatenate([x[4] for x in rb])
        )
        r = rob_m.accuracy_drop(np.concatenate([x[5] for x in rb]), np.concatenate([x[6] for x in rb]))
        out["robustness/fgsm_acc_clean"] = r["acc_clean"]
        out["robustness/fgsm_acc_adversarial"] = r["acc_adversarial"]
        out["robustness/fgsm_drop"] = r["drop"]

    for name, value in merged.get("geo", []):
        out[f"geometry/{name}"] = value


def _run_log_metrics(run_logs: dict, ev, fam: set, out: dict) -> None:
    s = ev.s
    if "smoothness" in fam:
        _smoothness_metrics(run_logs, ev, s.smooth_window, out)
    if "overhead" in fam:
        for tag, key in (
            ("throughput/tokens_per_s", "train_tokens_per_s"),
            ("time/step_s", "train_step_s"),
            ("memory/peak_allocated_gb", "train_peak_memory_gb"),
            ("memory/rss_gb", "train_rss_gb"),
        ):
            if run_logs.get(tag):
                vals = [v for _, v in sorted(run_logs[tag].items())]
                tail = vals[len(vals) // 2 :] or vals  # the second half: past start-up effects
                out[f"overhead/{key}"] = float(max(tail) if "memory" in tag else np.median(tail))


def _smoothness_metrics(run_logs: dict, ev, window: int, out: dict) -> None:
    """Grad-norm CV and spikes over `window`-step windows of every step's norm (`GRAD_NORM_EVERY_STEP`). A
    run logged before that series existed has only every `log_every`-th step's `train/grad_norm`: used
    then, with a note, since its windows span `log_every` times as many steps and spikes go unseen."""
    series = run_logs.get(GRAD_NORM_EVERY_STEP)
    if not series and run_logs.get("train/grad_norm"):
        series = run_logs["train/grad_norm"]
        ev.notes.append(
            f"smoothness: the run logged no {GRAD_NORM_EVERY_STEP}; computed from the logged steps of "
            "train/grad_norm only (windows span more steps, spikes between logged steps are missed)"
        )
    if not series:
        ev.notes.append(f"smoothness: the run's TensorBoard has no {GRAD_NORM_EVERY_STEP} or train/grad_norm")
        return
    steps = sorted(series)
    g = [series[step] for step in steps]
    out["smoothness/grad_norm_cv"] = opt_m.grad_norm_cv(g, window)
    out["smoothness/grad_norm_spikes"] = float(opt_m.grad_norm_spikes(g, 3.0, window))
    out["smoothness/logged_steps"] = float(len(g))
    out["smoothness/every_step"] = float(len(steps) == steps[-1] - steps[0] + 1)


def read_run_logs(run_dir: Path) -> dict[str, dict[int, float]]:
    folder = run_dir / "tensorboard"
    if not folder.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in acc.Tags()["scalars"]
        if not tag.startswith("evaluate/")
    }
