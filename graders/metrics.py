"""The text_similarity metrics, each a score in [0, 1] of a candidate (the rendered `input`) against a
reference.

- fuzzy_match: rapidfuzz's `fuzz.WRatio` on texts normalised by `utils.default_process` (lower case,
  punctuation to spaces), divided by 100: the fuzzy match OpenAI's graders guide shows. rapidfuzz is a
  small compiled wheel with no dependencies (3.2 MB download, 12 MB installed).
- bleu, gleu, rouge_1 ... rouge_5, rouge_l: written here from their standard definitions, on lower-cased
  Unicode word tokens (runs of letters and digits; punctuation dropped). The usual libraries are heavy for
  four formulas: nltk (+ click, joblib, regex, tqdm), rouge-score (+ nltk, absl-py), sacrebleu (+ lxml,
  portalocker, tabulate, colorama, numpy). On ASCII text the tokens are rouge-score's.
  - rouge_n: the F1 of clipped n-gram overlap (rouge-score's `fmeasure`); rouge_l: the F1 of the longest
    common token subsequence (computed by rapidfuzz's bit-parallel LCS, so long texts stay cheap).
  - bleu: sentence BLEU-4: the geometric mean of clipped n-gram precisions over the orders the candidate
    is long enough to have (sacrebleu's effective order, so an exact two-word answer scores 1), an order
    with no match smoothed by the NIST geometric sequence (1 / (2^k * count): sacrebleu's `exp`, nltk's
    method3), times the brevity penalty exp(1 - r/c) when the candidate is shorter. No unigram in common
    scores 0 (as nltk), not the small positive number smoothing alone would give.
  - gleu: Google-BLEU (Wu et al. 2016, nltk's `sentence_gleu`): all 1- to 4-grams, matches divided by the
    larger of the candidate's and the reference's n-gram counts, i.e. min(precision, recall).
- meteor needs WordNet synonyms and a stemmer (nltk and its data) and cosine an embedding model; both are
  refused at validation (UNSUPPORTED_METRICS says why). OpenAI does not offer cosine for fine-tuning either.

Either text without a token (or empty, for fuzzy_match) scores 0. Texts past MAX_FUZZY_CHARS (fuzzy_match)
or MAX_SIMILARITY_TOKENS (the others) are a sample error, not a slow reward."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable

from rapidfuzz import fuzz, utils
from rapidfuzz.distance import LCSseq

from graders.errors import OTHER_ERROR, SampleError
from graders.limits import MAX_FUZZY_CHARS, MAX_SIMILARITY_TOKENS

_WORD = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _bounded_tokens(text: str) -> list[str]:
    words = tokens(text)
    if len(words) > MAX_SIMILARITY_TOKENS:
        message = f"text_similarity compares texts of at most {MAX_SIMILARITY_TOKENS} words; got {len(words)}."
        raise SampleError(OTHER_ERROR, message)
    return words


def fuzzy_match(candidate: str, reference: str) -> float:
    a, b = utils.default_process(candidate), utils.default_process(reference)
    if max(len(a), len(b)) > MAX_FUZZY_CHARS:
        raise SampleError(
            OTHER_ERROR,
            f"fuzzy_match compares texts of at most {MAX_FUZZY_CHARS} characters (got {len(a)} and {len(b)}); "
            "use rouge_l, bleu or gleu for longer texts.",
        )
    return fuzz.WRatio(a, b) / 100.0


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _f1(overlap: int, candidate_count: int, reference_count: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / candidate_count, overlap / reference_count
    return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: str, reference: str, n: int) -> float:
    c, r = _ngrams(_bounded_tokens(candidate), n), _ngrams(_bounded_tokens(reference), n)
    return _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))


def rouge_l(candidate: str, reference: str) -> float:
    c, r = _bounded_tokens(candidate), _bounded_tokens(reference)
    if not c or not r:
        return 0.0
    return _f1(int(LCSseq.similarity(c, r)), len(c), len(r))


def bleu(candidate: str, reference: str, max_order: int = 4) -> float:
    c, r = _bounded_tokens(candidate), _bounded_tokens(reference)
    if not c or not r:
        return 0.0
    log_sum, orders, zero_matches = 0.0, 0, 0
    for n in range(1, max_order + 1):
        cand = _ngrams(c, n)
        total = sum(cand.values())
        if total == 0:  # the candidate is shorter than n: this order and those above do not count
            break
        matches = sum((cand & _ngrams(r, n)).values())
        if matches == 0:
            if n == 1:
                return 0.0
            zero_matches += 1
            precision = 1.0 / (2**zero_matches * total)
        else:
            precision = matches / total
        log_sum += math.log(precision)
        orders += 1
    brevity = 1.0 if len(c) >= len(r) else math.exp(1 - len(r) / len(c))
    return brevity * math.exp(log_sum / orders)


def gleu(candidate: str, reference: str, min_order: int = 1, max_order: int = 4) -> float:
    c, r = _bounded_tokens(candidate), _bounded_tokens(reference)
    cand, ref = Counter(), Counter()
    for n in range(min_order, max_order + 1):
        cand.update(_ngrams(c, n))
        ref.update(_ngrams(r, n))
    denominator = max(sum(cand.values()), sum(ref.values()))
    return sum((cand & ref).values()) / denominator if denominator else 0.0


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": (lambda a, b, n=n: rouge_n(a, b, n)) for n in range(1, 6)},
    "rouge_l": rouge_l,
}
UNSUPPORTED_METRICS = {
    "meteor": "METEOR needs WordNet synonyms and a stemmer, which this service does not ship",
    "cosine": "cosine similarity needs an embedding model, which graders cannot call here",
}
