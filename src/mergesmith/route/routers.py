"""Router kinds as small tensor functions: fit on features, score prompts, pick an expert.

Every kind gives a (prompts, experts) score matrix; the chosen expert is the row's argmax
and the confidence is a number a threshold can cut (below it, the fallback answers).
"""

from __future__ import annotations

import torch

KINDS = ("centroid", "classifier", "perplexity", "oracle")
# the kinds that read the base model's features
FEATURE_KINDS = ("centroid", "classifier")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def fit_centroids(features: torch.Tensor, labels: torch.Tensor, n_experts: int) -> torch.Tensor:
    """c_e = mean of the features of expert e's example prompts: (experts, hidden)."""
    return torch.stack([features[labels == e].mean(0) for e in range(n_experts)])


def centroid_scores(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """cos(f, c_e) for every prompt and expert; the confidence is the top cosine."""
    return unit_rows(features) @ unit_rows(centroids).T


def fit_classifier(features: torch.Tensor, labels: torch.Tensor, n_experts: int, *, l2: float = 1e-3,
                   steps: int = 200) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on standardized features (FoE's router, a linear layer):
    minimise mean_i -log softmax(W z_i + b)[y_i] + l2 |W|^2 with L-BFGS, z = (f - mu) / sigma."""
    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    weight = torch.zeros((n_experts, x.shape[1]), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_experts, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    return {"mean": mean.float(), "std": std.float(), "weight": weight.detach().float(), "bias": bias.detach().float()}


def classifier_scores(features: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """softmax(W (f - mu) / sigma + b): the confidence is the top probability."""
    z = (features.float() - params["mean"]) / params["std"]
    return torch.softmax(z @ params["weight"].T + params["bias"], dim=-1)


def perplexity_scores(losses: torch.Tensor) -> torch.Tensor:
    """softmax(-loss_e) over experts, from (prompts, experts) mean prompt losses: the lowest loss
    wins, and the confidence is its share."""
    return torch.softmax(-losses.double(), dim=-1).float()


def choose(scores: torch.Tensor, threshold: float | None) -> tuple[list[int], list[float]]:
    """Each row's argmax expert (-1: the fallback, when its score is below ``threshold``) and score."""
    best, picked = scores.max(dim=-1)
    chosen = [(-1 if threshold is not None and b < threshold else int(p)) for b, p in zip(best.tolist(), picked)]
    return chosen, best.tolist()


def best_threshold(confidence: list[float], expert_scores: list[float], fallback_scores: list[float]) -> float:
    """The cut that maximises the routed system's mean score on validation items: an item whose
    confidence is below it gets the fallback's score, one at or above it the chosen expert's.
    Candidate cuts sit just above each distinct confidence; ties go to the lowest cut (fewer items
    sent to the fallback); returns -inf when falling back never helps."""
    gain: dict[float, float] = {}
    for c, e, f in zip(confidence, expert_scores, fallback_scores):
        gain[c] = gain.get(c, 0.0) + f - e
    best, cut, total = 0.0, float("-inf"), 0.0
    for c in sorted(gain):  # a cut just above c sends every item with confidence <= c to the fallback
        total += gain[c]
        if total > best + 1e-12:
            best, cut = total, c + 1e-9 * max(1.0, abs(c))
    return cut
