"""Recall metrics and their synthetic probe sets.

Defined in docs/techniques.md: the training-frequency buckets (`[0,10]`, `(10,50]`, `(50,100]`, `(100,500]`,
`(500,1000]`, `(1000,∞)`; the key–value recall harness), CMR metric 1 (token recall against
length: key–value probes, exact match of the greedy value and teacher-forced top-1 accuracy),
CMR metric 2 (rare-token recall: top-1/top-5 at positions whose previous occurrence is ≥ 256
tokens earlier in the same context, per bucket), CMR metric 3 (numerical reasoning accuracy and
consistency), reused by HCMA metric 3 (long-range dependency tracking).

Probes are generated deterministically (a seeded `random.Random`) from held-out token streams:
filler is real held-out text, keys are words drawn from it; values and quantities are random.
Text templates are encoded with the caller's `encode(str) -> list[int]`, so probes follow the
checkpoint's tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

BUCKETS: tuple[tuple[float, float], ...] = (
    (-1, 10),
    (10, 50),
    (50, 100),
    (100, 500),
    (500, 1000),
    (1000, float("inf")),
)
"""`(lo, hi]` training-frequency buckets (the first is `[0, 10]`)."""
BUCKET_NAMES = ("0-10", "10-50", "50-100", "100-500", "500-1000", "1000+")


def bucket_index(frequency) -> np.ndarray:
    """Bucket (0..5) of each training frequency."""
    f = np.asarray(frequency, dtype=np.float64)
    out = np.zeros(f.shape, dtype=np.int64)
    for i, (lo, _) in enumerate(BUCKETS):
        out[f > lo] = i
    return out


def accuracy_by_bucket(ranks, target_frequency, ks: Sequence[int] = (1, 5), mask=None) -> dict:
    """Top-k accuracy (`rank < k`) per training-frequency bucket over the selected positions:
    `{bucket: {"top1": …, "top5": …, "count": n}}` (CMR metric 2, HCMA metric 1). Empty buckets
    are reported with count 0 and NaN accuracies."""
    ranks = np.asarray(ranks).reshape(-1)
    buckets = bucket_index(np.asarray(target_frequency).reshape(-1))
    keep = np.ones_like(ranks, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    out = {}
    for b, name in enumerate(BUCKET_NAMES):
        sel = keep & (buckets == b)
        n = int(sel.sum())
        row = {f"top{k}": (float((ranks[sel] < k).mean()) if n else float("nan")) for k in ks}
        row["count"] = n
        out[name] = row
    n = int(keep.sum())
    out["all"] = {**{f"top{k}": (float((ranks[keep] < k).mean()) if n else float("nan")) for k in ks}, "count": n}
    return out


def long_gap_mask(row: Sequence[int], gap: int) -> np.ndarray:
    """For a context `row` of `s + 1` tokens (inputs `row[:-1]`, labels `row[1:]`): True at label
    `j` when the label token occurred before inside this context and its most recent previous
    occurrence is at least `gap` positions earlier (CMR metric 2)."""
    row = np.asarray(row)
    last: dict[int, int] = {}
    out = np.zeros(len(row) - 1, dtype=bool)
    for i, tok in enumerate(row.tolist()):
        if i > 0:
            prev = last.get(tok)
            out[i - 1] = prev is not None and i - prev >= gap
        last[tok] = i
    return out


# ---------------------------------------------------------------------------- probe generation
_WORDLIKE = re.compile(r"^[A-Za-z]{5,12}$")


def key_words(text: str, limit: int = 2000) -> list[str]:
    """Distinct alphabetic words (5–12 letters) of held-out text, in order of first appearance,
    used as probe keys."""
    seen, out = set(), []
    for word in re.findall(r"[A-Za-z]+", text):
        w = word.lower()
        if _WORDLIKE.match(word) and w not in seen:
            seen.add(w)
            out.append(w)
            if len(out) >= limit:
                break
    return out


def _filler(stream: np.ndarray, length: int, rng: random.Random) -> list[int]:
    if length <= 0:
        return []
    if len(stream) <= length:
        reps = -(-length // max(len(stream), 1))
        return np.tile(stream, reps)[:length].tolist()
    start = rng.randrange(0, len(stream) - length)
    return stream[start : start + length].tolist()


@dataclass
class KVProbe:
    """One key–value recall sample (CMR metric 1): `context` ends with the query prefix; the
    model should continue with `answer`."""

    context: list[int]
    answer: list[int]
    key: str
    value: str
    facts: dict = field(default_factory=dict)
    depths: list = field(default_factory=list)


KV_FACT = " The secret code of {key} is {value}."
KV_QUERY = " The secret code of {key} is"


def make_kv_probes(
    filler_stream: Sequence[int],
    words: Sequence[str],
    encode: Callable[[str], list[int]],
    n_tokens: int,
    n_samples: int,
    n_facts: int = 8,
    seed: int = 0,
) -> list[KVProbe]:
    """`n_samples` key–value probes of exactly `n_tokens` context tokens (CMR metric 1).

    `n_facts` facts "The secret code of <key> is <value>." (distinct keys from `words`; values of
    3–5 random digits, one token each under split-digit tokenizers) are inserted at uniformly random
    depths into held-out filler text; the context ends with the query for one of the keys, and
    `answer` is the value's tokens. Deterministic in `seed` (and the inputs).
    """
    stream = np.asarray([t for t in filler_stream], dtype=np.int64)
    if len(words) < n_facts:
        raise ValueError(f"need at least {n_facts} key words, got {len(words)}")
    probes = []
    for i in range(n_samples):
        rng = random.Random(f"kv-{seed}-{n_tokens}-{i}")
        keys = rng.sample(list(words), n_facts)
        values = ["".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5))) for _ in keys]
        facts = [encode(KV_FACT.format(key=k, value=v)) for k, v in zip(keys, values)]
        q = rng.randrange(n_facts)
        query = encode(KV_QUERY.format(key=keys[q]))
        full = encode(KV_QUERY.format(key=keys[q]) + " " + values[q])
        # the value's tokens as they follow the query in running text (tokenizers merge spaces)
        answer = full[len(query) :] if full[: len(query)] == query else encode(" " + values[q])
        room = n_tokens - len(query) - sum(len(f) for f in facts)
        if room < 0:
            raise ValueError(f"n_tokens={n_tokens} is too short for {n_facts} facts and a query")
        filler = _filler(stream, room, rng)
        cuts = sorted(rng.randint(0, room) for _ in facts)
        context, prev, depths = [], 0, []
        for cut, fact in zip(cuts, facts):
            context += filler[prev:cut]
            depths.append(len(context))
            context += fact
            prev = cut
        context += filler[prev:] + query
        probes.append(KVProbe(context, answer, keys[q], values[q], dict(zip(keys, values)), depths))
    return probes


def exact_match(generated: Sequence[int], answer: Sequence[int]) -> float:
    """1.0 when the greedy continuation starts with exactly the answer tokens (CMR metric 1)."""
    return float(list(generated[: len(answer)]) == list(answer))


def teacher_forced_accuracy(predicted: Sequence[int], answer: Sequence[int]) -> float:
    """Mean top-1 accuracy over the value tokens when the true prefix is fed (CMR metric 1):
    `predicted[j]` is the arg-max prediction at the position whose label is `answer[j]`."""
    answer = list(answer)
    if not answer:
        return float("nan")
    return sum(int(p == a) for p, a in zip(predicted, answer)) / len(answer)


# ---------------------------------------------------------------------- numerical reasoning
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James", "Karen", "Louis")
OBJECTS = ("apples", "books", "coins", "stamps", "marbles", "tickets", "shells", "pencils")
QUESTIONS = {
    "sum": (
        " Question: How many {obj} do {a} and {b} have in total? Answer:",
        " Question: What is the total number of {obj} that {a} and {b} hold together? Answer:",
    ),
    "difference": (
        " Question: How many more {obj} does {a} have than {b}? Answer:",
        " Question: By how many {obj} does {a} exceed {b}? Answer:",
    ),
    "comparison": (
        " Question: Who has more {obj}, {a} or {b}? Answer:",
        " Question: Between {a} and {b}, who holds the larger number of {obj}? Answer:",
    ),
}


@dataclass
class NumericProbe:
    """A numerical-reasoning item (CMR metric 3): the same quantities asked twice, with
    paraphrased questions placed at different depths (`context_a`, `context_b`)."""

    context_a: list[int]
    context_b: list[int]
    answer: str
    kind: str
    quantities: dict = field(default_factory=dict)


def make_numeric_probes(
    filler_stream: Sequence[int], encode: Callable[[str], list[int]], n_tokens: int, n_samples: int, seed: int = 0
) -> list[NumericProbe]:
    """Templated passages (CMR metric 3): 2–4 quantities "<name> has <n> <objects>." introduced
    early, filler from held-out text up to `n_tokens`, then one question (sum, difference or
    comparison of two of them). Variant A puts the quantities at the start, variant B a third of
    the way in (so the question sits at a different depth from them) and asks the paraphrase."""
    stream = np.asarray(list(filler_stream), dtype=np.int64)
    kinds = tuple(QUESTIONS)
    probes = []
    for i in range(n_samples):
        rng = random.Random(f"num-{seed}-{n_tokens}-{i}")
        names = rng.sample(NAMES, rng.randint(2, 4))
        obj = rng.choice(OBJECTS)
        counts = rng.sample(range(2, 60), len(names))
        intro = encode("".join(f" {n} has {c} {obj}." for n, c in zip(names, counts)))
        a, b = rng.sample(names, 2)
        ca, cb = counts[names.index(a)], counts[names.index(b)]
        kind = kinds[i % len(kinds)]
        if kind == "difference" and ca < cb:
            a, b, ca, cb = b, a, cb, ca
        answer = {"sum": str(ca + cb), "difference": str(ca - cb), "comparison": a if ca > cb else b}[kind]
        q1, q2 = (encode(t.format(obj=obj, a=a, b=b)) for t in QUESTIONS[kind])
        contexts = []
        for question, depth_fraction in ((q1, 0.0), (q2, 1.0 / 3.0)):
            room = n_tokens - len(intro) - len(question)
            if room < 0:
                raise ValueError(f"n_tokens={n_tokens} is too short for a numerical probe")
            filler = _filler(stream, room, rng)
            before = int(room * depth_fraction)
            contexts.append(filler[:before] + intro + filler[before:] + question)
        probes.append(NumericProbe(contexts[0], contexts[1], answer, kind, dict(zip(names, counts))))
    return probes


_ANSWER = re.compile(r"-?\d+|[A-Za-z]+")


def parse_answer(text: str) -> str:
    """The first number or word of a generated answer ("" when there is none)."""
    m = _ANSWER.search(text)
    return m.group(0) if m else ""


def numeric_scores(answers_a: Sequence[str], answers_b: Sequence[str], truth: Sequence[str]) -> dict:
    """Accuracy (exact match of the parsed answer, both variants pooled) and consistency (the two
    paraphrased variants give the same parsed answer) (CMR metric 3)."""
    n = len(truth)
    if n == 0:
        return {"accuracy": float("nan"), "consistency": float("nan"), "samples": 0}
    correct = sum(int(x == t) for x, t in zip(answers_a, truth)) + sum(int(x == t) for x, t in zip(answers_b, truth))
    agree = sum(int(x == y) for x, y in zip(answers_a, answers_b))
    return {"accuracy": correct / (2 * n), "consistency": agree / n, "samples": n}


def frequency_of(targets, counts: np.ndarray) -> np.ndarray:
    """Training frequency of each target id (0 for ids outside `counts`)."""
    t = np.asarray(targets, dtype=np.int64)
    f = np.zeros(t.shape, dtype=np.int64)
    ok = (t >= 0) & (t < len(counts))
    f[ok] = counts[t[ok]]
    return f
