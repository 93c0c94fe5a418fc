"""Per-item metrics, their means and bootstrap confidence intervals.

Multiple choice: the prediction is the argmax of the summed log-likelihood
(``acc``), of the log-likelihood per token of the continuation as scored
(``acc_norm_tokens``), or per character of the choice text as written, delimiter
excluded (``acc_norm_chars``, lm-eval's ``acc_norm``). Ties go to the first choice.

Generation, each the best over the references: ``exact_match`` after SQuAD-style
normalization (lower case, no punctuation, no articles, single spaces), ``f1`` over
normalized tokens, and ``rougeL`` (F-measure, from the ``rouge-score`` library,
with stemming; left out, with a note, when that optional library is missing).

Confidence intervals are percentile bootstraps over items. The macro average's
interval resamples the items of each task independently, then averages the task
means, so every task keeps its equal weight in every resample.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from mergesmith.errors import InputError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def mc_choices(loglikelihoods: Sequence[float], num_tokens: Sequence[int], choices: Sequence[str]) -> dict[str, int]:
    """The chosen index under each multiple-choice metric."""
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    return {
        "acc": int(np.argmax(ll)),
        "acc_norm_chars": int(np.argmax(ll / np.array([len(c) for c in choices], dtype=np.float64))),
        "acc_norm_tokens": int(np.argmax(ll / np.asarray(num_tokens, dtype=np.float64))),
    }


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    return max(_f1(prediction, r) for r in references)


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise InputError("generation tasks need the rouge-score package for ROUGE-L: "
                         "pip install 'mergesmith[eval]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    scorer = _rouge_scorer()
    return max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references)


def rouge_available() -> bool:
    from mergesmith.extras import missing_modules

    if missing_modules(["rouge_score"]):  # found without importing it
        return False
    try:
        _rouge_scorer()
        return True
    except InputError:
        return False


def generation_scores(prediction: str, references: Sequence[str], rouge: bool = True) -> dict[str, float]:
    scores = {"exact_match": exact_match(prediction, references), "f1": token_f1(prediction, references)}
    if rouge:
        scores["rougeL"] = rouge_l(prediction, references)
    return scores


def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Optional[tuple[float, float]]:
    """Percentile interval of the mean; None when there is nothing to resample."""
    return macro_bootstrap_ci([values], resamples=resamples, seed=seed, level=level)


def macro_bootstrap_ci(per_task: Sequence[Sequence[float]], *, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> Optional[tuple[float, float]]:
    """Percentile interval of the mean of task means, items resampled within each task."""
    arrays = [np.asarray(v, dtype=np.float64) for v in per_task if len(v)]
    if not arrays or resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in arrays:
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        means += values[picks].mean(axis=1)
    means /= len(arrays)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
