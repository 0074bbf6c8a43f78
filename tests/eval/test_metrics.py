"""Every metric of techniques/metrics on a constructed case with a known answer."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loom.techniques.metrics import (
    attention,
    entropy,
    geometry,
    lexical,
    optimization,
    perplexity,
    recall,
    representation,
    robustness,
)
from tests.harness import run_distributed


# ----------------------------------------------------------------------------------- perplexity
def test_ppl_f_is_zero_for_identical_windows():
    out = perplexity.ppl_fluctuation([torch.full((2048,), 2.5), torch.full((512,), 0.7)], window=128, stride=64)
    assert out == {"ppl_f": 0.0, "ppl_cv": 0.0, "documents": 2}


def test_ppl_f_and_cv_on_two_windows():
    # windows of 2 with stride 2 over [1,1,3,3]: log PPL = (1, 3) → std 1; CV = tanh(1)
    out = perplexity.ppl_fluctuation([torch.tensor([1.0, 1.0, 3.0, 3.0])], window=2, stride=2)
    assert out["ppl_f"] == pytest.approx(1.0)
    assert out["ppl_cv"] == pytest.approx(math.tanh(1.0))


def test_ppl_f_skips_documents_without_two_windows():
    assert perplexity.ppl_fluctuation([torch.ones(100)], 128, 64)["documents"] == 0


def test_window_plan_scores_every_position_once():
    for n, w, s in ((64, 64, 32), (100, 64, 32), (1000, 64, 32), (257, 256, 128), (300, 64, 64)):
        seen = np.zeros(n, dtype=int)
        for start, keep in perplexity.plan_windows(n, w, s):
            assert 0 <= start and start + w <= n
            seen[start + keep : start + w] += 1
            if start > 0:
                assert keep >= w - s  # every scored position has at least w - s earlier positions
        assert (seen == 1).all(), (n, w, s)


def test_perplexity_gain_and_restricted_nll():
    assert perplexity.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity.nll_gain(torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.0])) == pytest.approx(3.0)
    out = perplexity.restricted_nll(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([5, 100, 101]), 100)
    assert out == {"nll": pytest.approx(1.5), "tokens": 2}


# -------------------------------------------------------------------------------------- entropy
def test_uniform_logits_have_entropy_log_v():
    for v in (2, 17, 2048):
        assert float(entropy.entropy(torch.zeros(v))) == pytest.approx(math.log(v))
        assert float(entropy.vocab_parallel_entropy(torch.zeros(3, v))[0]) == pytest.approx(math.log(v))


def test_one_hot_logits_have_zero_entropy_and_padding_drops_out():
    z = torch.tensor([0.0, 1e4, 0.0, -1e30])  # a padded column at -1e30 contributes nothing
    assert float(entropy.vocab_parallel_entropy(z)) == pytest.approx(0.0, abs=1e-6)
    z = torch.tensor([0.0, 0.0, -1e30, -1e30])
    assert float(entropy.vocab_parallel_entropy(z)) == pytest.approx(math.log(2))


def test_token_stats_single_rank():
    torch.manual_seed(0)
    z = torch.randn(5, 3, 11)
    y = torch.randint(0, 11, (5, 3))
    out = entropy.vocab_parallel_token_stats(z, y, 0, column_scale=torch.ones(11))
    ref_nll = F.cross_entropy(z.reshape(-1, 11), y.reshape(-1), reduction="none").reshape(5, 3)
    assert torch.allclose(out["nll"], ref_nll, atol=1e-5)
    assert torch.allclose(out["entropy"], entropy.entropy(z), atol=1e-5)
    ref_rank = (z > z.gather(-1, y[..., None])).sum(-1)
    assert torch.equal(out["rank"], ref_rank) and torch.equal(out["rank_cos"], ref_rank)
    assert torch.equal(out["argmax"], z.argmax(-1))


def _sharded_stats(rank, world, z, y, scale):
    local = z.shape[-1] // world
    shard = z[..., rank * local : (rank + 1) * local]
    out = entropy.vocab_parallel_token_stats(
        shard, y, rank * local, torch.distributed.group.WORLD, column_scale=scale[rank * local : (rank + 1) * local]
    )
    return {k: v.clone() for k, v in out.items()}


def test_vocab_parallel_reductions_match_the_full_vocabulary():
    torch.manual_seed(1)
    z = torch.randn(4, 2, 12) * 3
    z[..., -1] = -1e30  # a padded column on the last shard
    y = torch.randint(0, 11, (4, 2))
    scale = torch.rand(12) + 0.5
    full = entropy.vocab_parallel_token_stats(z, y, 0, column_scale=scale)
    for out in run_distributed(_sharded_stats, 2, z, y, scale):
        for key in ("nll", "entropy"):
            assert torch.allclose(out[key], full[key], atol=1e-5), key
        for key in ("rank", "rank_cos", "argmax"):
            assert torch.equal(out[key], full[key]), key


def test_entropy_variance_and_sequence_stats():
    assert entropy.entropy_variance([torch.full((10,), 3.0), torch.full((4,), 1.0)]) == 0.0
    assert entropy.entropy_variance([torch.tensor([1.0, 3.0])]) == pytest.approx(1.0)
    out = entropy.sequence_entropy_stats([torch.tensor([1.0, 3.0]), torch.tensor([4.0])])
    assert out == {"mean": pytest.approx(3.0), "var": pytest.approx(1.0), "sequences": 2}


# -------------------------------------------------------------------------------------- lexical
def test_lexical_instability():
    assert lexical.lexical_instability([1, 2, 3, 3], [3, 2, 1]) == 0.0
    assert lexical.lexical_instability([1, 2], [3, 4]) == 1.0
    assert lexical.lexical_instability([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)


def test_rep4_and_distinct2():
    assert lexical.rep_n(list(range(10)), 4) == 0.0
    assert lexical.rep_n([7] * 10, 4) == pytest.approx(1 - 1 / 7)
    assert math.isnan(lexical.rep_n([1, 2, 3], 4))
    assert lexical.distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)
    assert lexical.distinct_n(list(range(5)), 2) == 1.0


def test_sentence_length_std():
    assert lexical.sentence_length_std("One two three. Four five six! Seven eight nine?") == 0.0
    assert lexical.sentence_length_std("A b. C d e f.") == pytest.approx(1.0)
    assert lexical.sentence_lengths("Hello world\n\nnext para here") == [2, 3]
    assert math.isnan(lexical.sentence_length_std("... !!"))
    assert math.isnan(lexical.sentence_length_std("Only one sentence here."))


# ------------------------------------------------------------------------------- representation
def test_latent_drift():
    h = torch.randn(1, 8).repeat(6, 1)
    assert representation.latent_drift(h) == pytest.approx(0.0, abs=1e-12)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # orthogonal steps: drift 1
    assert representation.latent_drift(h) == pytest.approx(1.0)
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    start = torch.tensor([True, True, False])  # the reversal at t=1 is a document start: excluded
    assert representation.latent_drift(h, start) == pytest.approx(0.0)


def test_representation_variability():
    assert representation.representation_variability(torch.ones(5, 3)) == 0.0
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # zero mean: all energy is variation
    assert representation.representation_variability(h) == pytest.approx(1.0)


def test_effective_rank():
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    assert representation.effective_rank(u @ v + 3.0) == pytest.approx(1.0, abs=1e-6)  # rank 1 after centring
    q, _ = torch.linalg.qr(torch.randn(64, 8))
    x = torch.cat([q, -q]) * 5  # centred, 8 equal singular values
    assert representation.effective_rank(x) == pytest.approx(8.0, rel=1e-6)


def test_anisotropy():
    assert representation.anisotropy(torch.tensor([[1.0, 2.0]]).repeat(10, 1)) == pytest.approx(1.0)
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert representation.anisotropy(x) == pytest.approx(-1.0)


def test_coherence_score_and_margin():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    doc1 = a.repeat(256, 1)  # two chunks of 128, both along a
    doc2 = b.repeat(384, 1)  # three chunks along b
    c1, c2 = representation.chunk_means(doc1, 128), representation.chunk_means(doc2, 128)
    assert c1.shape == (2, 2) and c2.shape == (3, 2)
    assert representation.coherence(c1) == pytest.approx(1.0)
    out = representation.coherence_report([c1, c2])
    assert out["coh"] == pytest.approx(1.0) and out["cross_doc_cos"] == pytest.approx(0.0)
    assert out["margin"] == pytest.approx(1.0) and out["documents"] == 2


def test_coherence_margin_never_pairs_segments_of_one_document():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    seg1, seg2, other = a.repeat(2, 1), a.repeat(2, 1), b.repeat(2, 1)
    out = representation.coherence_report([seg1, seg2, other], groups=[7, 7, 9])
    assert out["cross_doc_cos"] == pytest.approx(0.0) and out["margin"] == pytest.approx(1.0)
    assert math.isnan(representation.coherence_report([seg1, seg2], groups=[7, 7])["margin"])


def test_self_consistency():
    states = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = representation.self_consistency(states, [5, 5, 9, 9], [0, 1, 0, 1], baseline_cos=0.25)
    assert out == {"same_token_cos": pytest.approx(1.0), "self_consistency": pytest.approx(0.75), "tokens": 2}
    out = representation.self_consistency(states, [5, 5, 9, 9], [0, 0, 1, 1], baseline_cos=0.0)
    assert out["tokens"] == 0  # never in two different documents


# ------------------------------------------------------------------------------------ attention
def test_js_divergence_known_values():
    p = torch.tensor([1.0, 0.0])
    assert float(attention.js_divergence(p, p)) == 0.0
    assert float(attention.js_divergence(p, torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2))


def test_ahd_and_dispersion():
    uniform = torch.full((1, 4, 8), 1 / 8)  # [b, Q, s]
    assert attention.cross_layer_ahd([uniform, uniform, uniform]) == [0.0, 0.0]
    one = torch.zeros(1, 4, 8)
    one[..., 0] = 1
    other = torch.zeros(1, 4, 8)
    other[..., 1] = 1
    assert attention.cross_layer_ahd([one, other]) == [pytest.approx(math.log(2))]
    same_heads = one.unsqueeze(1).repeat(1, 3, 1, 1)  # [b, h, Q, s]: identical heads → D = 0
    assert attention.head_dispersion(same_heads) == 0.0
    two = torch.stack([one, other], 1)  # two disjoint heads: JS(head ‖ mean) = log 2 − ½ log 4 ... = ½ log 2·…
    m = 0.5 * (one + other)
    expected = float(attention.js_divergence(one, m).mean())
    assert attention.head_dispersion(two) == pytest.approx(expected)


def test_attention_probabilities_match_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    pos = torch.tensor([0, 4, 9])
    probs = attention.attention_probabilities(q, k, pos)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, pos]
    assert torch.allclose(probs @ v, out, atol=1e-5)
    assert (probs[:, :, 0, 1:] == 0).all()


# --------------------------------------------------------------------------------------- recall
def toy_encode(text):
    """Word-level toy tokenizer: one id per whitespace-separated piece (digits one id each)."""
    ids = []
    for piece in text.replace(".", " .").split():
        if piece.isdigit():
            ids += [1000 + int(c) for c in piece]
        else:
            ids.append(2000 + sum(map(ord, piece)) % 5000)
    return ids


def test_frequency_buckets():
    assert recall.bucket_index([0, 10, 11, 50, 51, 100, 101, 500, 501, 1000, 1001, 10**6]).tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]


def test_accuracy_by_bucket():
    out = recall.accuracy_by_bucket([0, 3, 7, 0], [5, 5, 5, 2000], ks=(1, 5))
    assert out["0-10"] == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3), "count": 3}
    assert out["1000+"]["top1"] == 1.0 and out["10-50"]["count"] == 0
    assert out["all"]["count"] == 4


def test_long_gap_mask():
    row = [5, 1, 2, 3, 5, 5, 9]  # labels are row[1:]
    # label index 3 is the 5 at row position 4: previous 5 at position 0 → gap 4
    assert recall.long_gap_mask(row, 4).tolist() == [False, False, False, True, False, False]
    assert recall.long_gap_mask(row, 5).tolist() == [False] * 6


def _oracle_kv_answer(context, encode, key: str, answer_len: int) -> list[int]:
    """What a perfect-recall model would answer: find the fact "The secret code of <key> is" in the context
    (not the final query) and copy the tokens after it."""
    pattern = encode(recall.KV_QUERY.format(key=key))
    ctx = list(context)
    for i in range(len(ctx) - len(pattern) - answer_len, -1, -1):
        if ctx[i : i + len(pattern)] == pattern and i + len(pattern) < len(ctx) - 1:
            return ctx[i + len(pattern) : i + len(pattern) + answer_len]
    return []


def test_kv_probes_are_deterministic_and_an_oracle_recalls_everything():
    filler = list(range(100, 400))
    words = [f"word{chr(97 + i)}xyz" for i in range(20)]
    probes = recall.make_kv_probes(filler, words, toy_encode, n_tokens=300, n_samples=10, n_facts=8, seed=3)
    again = recall.make_kv_probes(filler, words, toy_encode, n_tokens=300, n_samples=10, n_facts=8, seed=3)
    assert [p.context for p in probes] == [p.context for p in again]
    assert all(len(p.context) == 300 for p in probes)
    assert all(3 <= len(p.answer) <= 5 for p in probes)
    oracle = [_oracle_kv_answer(p.context, toy_encode, p.key, len(p.answer)) for p in probes]
    assert np.mean([recall.exact_match(o, p.answer) for o, p in zip(oracle, probes)]) == 1.0
    assert np.mean([recall.teacher_forced_accuracy(o, p.answer) for o, p in zip(oracle, probes)]) == 1.0
    wrong = [[0] * len(p.answer) for p in probes]
    assert np.mean([recall.exact_match(w, p.answer) for w, p in zip(wrong, probes)]) == 0.0


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def _asked_about(probe) -> tuple[str, str, str]:
    """(a, b, objects) of the question that ends both contexts: the one pair and object whose two
    question wordings (recall.QUESTIONS) end context_a and context_b."""
    found = []
    for a in probe.quantities:
        for b in probe.quantities:
            for obj in recall.OBJECTS:
                q1, q2 = (toy_encode(t.format(obj=obj, a=a, b=b)) for t in recall.QUESTIONS[probe.kind])
                if a != b and probe.context_a[-len(q1) :] == q1 and probe.context_b[-len(q2) :] == q2:
                    found.append((a, b, obj))
    assert len(found) == 1, f"{probe.kind}: questions matching the contexts: {found}"
    return found[0]


def test_numeric_probes_oracle_and_consistency():
    probes = recall.make_numeric_probes(list(range(100, 400)), toy_encode, n_tokens=200, n_samples=9, seed=1)
    assert all(len(p.context_a) == 200 and len(p.context_b) == 200 for p in probes)
    assert {p.kind for p in probes} == {"sum", "difference", "comparison"}
    for p in probes:
        a, b, obj = _asked_about(p)
        ca, cb = p.quantities[a], p.quantities[b]
        for name, count in p.quantities.items():  # every quantity is stated in both contexts
            stated = toy_encode(f" {name} has {count} {obj}.")
            assert _contains(p.context_a, stated) and _contains(p.context_b, stated), (name, count)
        expected = {"sum": str(ca + cb), "difference": str(abs(ca - cb)), "comparison": a if ca > cb else b}
        assert p.answer == expected[p.kind], (p.kind, a, ca, b, cb, p.answer)
        if p.kind == "difference":
            assert ca > cb, "the difference question asks how many more the larger one has"
    truth = [p.answer for p in probes]
    assert recall.numeric_scores(truth, truth, truth) == {"accuracy": 1.0, "consistency": 1.0, "samples": 9}
    half = recall.numeric_scores(truth, ["x"] * 9, truth)
    assert half == {"accuracy": 0.5, "consistency": 0.0, "samples": 9}
    assert recall.parse_answer(" 42 apples") == "42" and recall.parse_answer(" Bob.") == "Bob"


# ------------------------------------------------------------------------------------- geometry
def test_silhouette_of_separated_clusters_is_one():
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    labels = torch.tensor([0] * 5 + [1] * 5)
    assert geometry.silhouette_cosine(x, labels) == pytest.approx(1.0)
    # hand-computed case: points at 0°, 90° (cluster 0) and 180° (cluster 1), cosine distances
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s0 = (2.0 - 1.0) / 2.0  # a = d(0°,90°) = 1, b = d(0°,180°) = 2
    s1 = (1.0 - 1.0) / 1.0  # a = 1, b = d(90°,180°) = 1
    assert geometry.silhouette_cosine(x, torch.tensor([0, 0, 1]), chunk=2) == pytest.approx((s0 + s1 + 0.0) / 3)


def test_knn_overlap():
    torch.manual_seed(0)
    e = torch.randn(200, 16)
    assert geometry.knn_overlap(e, e, 10) == 1.0
    assert geometry.knn_overlap(e, e * 3.0, 10) == 1.0  # cosine: scale-free
    assert geometry.knn_overlap(e, torch.randn(200, 16), 10) < 0.3


def test_low_density_fraction():
    torch.manual_seed(0)
    tight = F.normalize(torch.tensor([1.0, 0.0, 0.0]) + 0.001 * torch.randn(96, 3), dim=-1)
    far = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    table = torch.cat([tight, far])
    assert geometry.low_density_fraction(table, knn=4, pi_max=4.0) == pytest.approx(4 / 100)


def test_retrieval_at_k():
    out = geometry.retrieval_at_k([0, 9, 10], [1, 1, 1], ks=(1, 10))
    assert out["0-10"] == {"top1": pytest.approx(1 / 3), "top10": pytest.approx(2 / 3), "count": 3}


# ----------------------------------------------------------------------------------- robustness
def test_token_substitution_and_deltas():
    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert robustness.nearest_neighbours(table).tolist() == [1, 0, 3, 2]
    ctx = [0, 2] * 50
    pert, pos = robustness.substitute_tokens(ctx, robustness.nearest_neighbours(table), 0.05, seed=1, protect=[0])
    assert len(pos) == 5 and 0 not in pos
    assert sum(a != b for a, b in zip(ctx, pert)) == 5
    assert robustness.delta_nll(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])) == pytest.approx(1.0)
    assert robustness.delta_nll(torch.ones(3), torch.ones(3)) == 0.0
    assert robustness.top1_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75


def test_fgsm_l2_step_has_the_specified_size():
    e = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    g = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    out = robustness.fgsm_l2(e, g, 0.01)
    assert torch.allclose(out[0], torch.tensor([3.0, 4.0 + 0.05]))  # ε = 0.01·‖e‖ = 0.05 along g
    assert torch.equal(out[1], e[1])  # zero gradient: unchanged
    assert robustness.accuracy_drop(torch.tensor([1, 1, 0, 1]), torch.tensor([1, 0, 0, 0])) == {
        "acc_clean": 0.75,
        "acc_adversarial": 0.25,
        "drop": 0.5,
    }


# --------------------------------------------------------------------------------- optimization
def test_grad_norm_smoothness():
    assert optimization.grad_norm_cv([2.0] * 300) == 0.0
    assert optimization.grad_norm_cv([1.0, 3.0]) == pytest.approx(0.5)
    series = [1.0] * 150
    series[120] = 10.0
    assert optimization.grad_norm_spikes(series) == 1
    assert optimization.grad_norm_spikes([1.0] * 150) == 0
