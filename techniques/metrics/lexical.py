"""Lexical statistics of generated text: lexical instability (LI), rep-n, distinct-n and the
sentence-length standard deviation.

Defined in docs/techniques.md: LCM metric 3 (LI, rep-4, sentence-length std) and SCR metric 1
(distinct-2). Token-level functions take sequences of token ids; the sentence statistic takes the
decoded text.
"""

from __future__ import annotations

import math
import re
from typing import Hashable, Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"\w+", re.UNICODE)


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def lexical_instability(continuation_1: Sequence[Hashable], continuation_2: Sequence[Hashable]) -> float:
    """`LI = 1 − Jaccard(unigram set of continuation 1, unigram set of continuation 2)` for one
    prompt (LCM metric 3); average it over prompts."""
    return 1.0 - jaccard(set(continuation_1), set(continuation_2))


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Sequence[Hashable], n: int = 4) -> float:
    """`rep-n = 1 − (distinct n-grams) / (n-grams)` of one generation (LCM metric 3, n = 4);
    NaN when the generation has no n-gram."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else float("nan")


def distinct_n(tokens: Sequence[Hashable], n: int = 2) -> float:
    """`distinct-n = (distinct n-grams) / (n-grams)` of generated text (SCR metric 1, n = 2);
    NaN when there is no n-gram."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else float("nan")


def sentence_lengths(text: str) -> list[int]:
    """Words per sentence; sentences end at `.`, `!` or `?` followed by whitespace, or at a blank
    line; a trailing unterminated sentence counts; sentences without words are dropped."""
    lengths = []
    for sentence in _SENTENCE_END.split(text):
        words = _WORD.findall(sentence)
        if words:
            lengths.append(len(words))
    return lengths


def sentence_length_std(text: str) -> float:
    """Population std of the sentence lengths (in words) of one generation (LCM metric 3);
    NaN when the text has fewer than two sentences (a spread needs two); average it over
    generations."""
    lengths = sentence_lengths(text)
    if len(lengths) < 2:
        return float("nan")
    mean = sum(lengths) / len(lengths)
    return math.sqrt(sum((x - mean) ** 2 for x in lengths) / len(lengths))


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there are none): the "averaged over prompts /
    generations" of the LCM metrics when some generations have no n-gram or sentence."""
    kept = [v for v in values if v == v and not math.isinf(v)]
    return sum(kept) / len(kept) if kept else float("nan")
