"""PCB-Merging: a case worked by hand from the paper's equations, properties, and
agreement with a direct transcription of the authors' ``PCB_merge`` (``pcb-merging.py``,
github.com/duguodong7/pcb-merging), kept below apart from the library code. FusionBench
0.2.33 has no PCB, so there is no package to compare with.
"""

from __future__ import annotations

import pytest
import torch

import mergesmith
from mergesmith.methods import TensorGroup, get_method
from tiny_models import finetuned_tensors as finetunes, load_state, max_relative_difference as rel_diff


def merge(base, models, weights=None, vocab=False, **params):
    weights = weights or [1.0] * len(models)
    return get_method("pcb").fn(TensorGroup(
        name="t", tensors=[base, *models], params={"density": 0.1, "lambda": 1.0, **params},
        model_params=[{}] + [{"weight": w} for w in weights], base_index=0, vocab=vocab))


# ---------------------------------------------------------------- reference transcription
# Unoptimized, after the authors' normalize / clamp / PCB_merge (whole sorts, no guards).

def ref_normalize(x, dim):
    lo = x.min(dim=dim, keepdim=True).values
    hi = x.max(dim=dim, keepdim=True).values
    return (x - lo) / (hi - lo)


def ref_clamp(x, min_ratio, max_ratio):
    d = x.size(1)
    ordered = torch.sort(x, dim=1).values
    lo = ordered[:, int(d * min_ratio)].unsqueeze(1)
    hi = ordered[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def ref_pcb_merge(flat, ratio):
    n, _ = flat.shape
    mags = ref_clamp(flat.abs(), 0.0001, 0.0001)
    clamped = torch.sign(flat) * mags
    intra = torch.exp(n * ref_normalize(mags, 1) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0))
    scale = ref_normalize(ref_clamp(intra * inter, 1 - ratio, 0), dim=1)
    return (clamped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


def ref_pcb_tensor(base, models, density, lam=1.0):
    flat = torch.stack([(m - base).reshape(-1) for m in models])
    return base + lam * ref_pcb_merge(flat, density).reshape(base.shape)


# ---------------------------------------------------------------- hand-computed case

def test_hand_computed_two_tasks():
    # d = 4, T = 2, density 0.5.
    # Clip: sorted|tau_1| = (0, 1, 2, 4), bounds sorted[int(4e-4)] = 0, sorted[int(4 * 0.9999 - 1)]
    # = sorted[2] = 2, so a_1 = (1, 2, 0, 2); a_2 = clip((2, 1, 1, 0), 0, 1) = (1, 1, 1, 0).
    # Intra: Norm(a_1) = (.5, 1, 0, 1), exp(2 x^2) = (e^.5, e^2, 1, e^2); Norm(a_2) = (1, 1, 1, 0),
    # exp -> (e^2, e^2, e^2, 1). Inter: sum tau = (3, -1, -1, 4), tanh(tau_1 * sum) =
    # tanh(3, 2, 0, 16), tanh(tau_2 * sum) = tanh(6, -1, 1, 0).
    # beta_1 = (1.64, 7.12, 0, 7.39): floor at sorted[int(4 * .5)] = 7.12 -> Norm -> (0, 0, 0, 1).
    # beta_2 = (7.39, -5.63, 5.63, 0): floor 5.63 -> Norm -> (1, 0, 0, 0).
    # tau = (1 * sgn(2) * 1, 0, 0, 1 * sgn(4) * 2) / (1, 1e-12, 1e-12, 1) = (1, 0, 0, 2).
    t1 = torch.tensor([1.0, -2.0, 0.0, 4.0])
    t2 = torch.tensor([2.0, 1.0, -1.0, 0.0])
    out = merge(torch.zeros(4), [t1, t2], density=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0, 2.0]))
    # lambda scales the merged task vector.
    torch.testing.assert_close(merge(torch.ones(4), [t1 + 1, t2 + 1], density=0.5, **{"lambda": 0.5}),
                               torch.tensor([1.5, 1.0, 1.0, 2.0]))


# ---------------------------------------------------------------- against the authors' algorithm

@pytest.mark.parametrize("shape,k,density", [((40, 30), 3, 0.1), ((97,), 2, 0.3), ((8, 16), 4, 0.5),
                                             ((300, 240), 3, 0.1)])
def test_matches_authors_algorithm(shape, k, density):
    # (300, 240) has 72000 entries, enough for the sampled order-statistic path.
    base, models = finetunes(shape, k, seed=k + len(shape))
    assert rel_diff(merge(base, models, density=density), ref_pcb_tensor(base, models, density)) < 1e-6


def test_matches_authors_algorithm_with_lambda_and_weights():
    base, models = finetunes((20, 10), 3, seed=4)
    weights = [0.5, 1.5, 1.0]
    scaled = [base + w * (m - base) for m, w in zip(models, weights)]
    ours = merge(base, models, weights=weights, density=0.2, **{"lambda": 1.3})
    assert rel_diff(ours, ref_pcb_tensor(base, scaled, 0.2, lam=1.3)) < 1e-6


# ---------------------------------------------------------------- properties

def test_one_model_keeps_its_clipped_task_vector_where_scored():
    # With one task every kept entry has weight m / m = 1: its clipped value comes back.
    base, (model,) = finetunes((50, 20), 1, seed=2)
    tau = model - base
    merged = merge(base, [model], density=0.3) - base
    kept = merged != 0
    lo, hi = torch.sort(tau.abs().reshape(-1)).values[[0, int(1000 * 0.9999 - 1)]]
    clipped = tau.sign() * tau.abs().clamp(lo, hi)
    torch.testing.assert_close(merged[kept], clipped[kept])
    assert 0.25 * tau.numel() < kept.sum() <= 0.3 * tau.numel()


def test_scores_are_per_tensor_and_shape_blind():
    # Scoring depends only on a tensor's entries, not on its shape: a matrix and its
    # flattened copy merge the same; a 1-D tensor gets the same treatment as a matrix.
    base, models = finetunes((12, 9), 3, seed=6)
    flat = merge(base.reshape(-1), [m.reshape(-1) for m in models])
    torch.testing.assert_close(merge(base, models).reshape(-1), flat)
    torch.testing.assert_close(merge(base, models, vocab=True), merge(base, models))


def test_weight_scales_the_task_vector_before_scoring():
    base, models = finetunes((30,), 3, seed=8)
    weights = [2.0, 0.5, 1.0]
    scaled = [base + w * (m - base) for m, w in zip(models, weights)]
    torch.testing.assert_close(merge(base, models, weights=weights), merge(base, scaled))


def test_constant_or_zero_task_vectors_do_not_make_nan():
    base, models = finetunes((10,), 2, seed=3)
    out = merge(base, [*models, base.clone()])
    assert torch.isfinite(out).all()
    assert torch.equal(merge(base, [base.clone(), base.clone()]), base)
    # A single-entry tensor: every order statistic is the entry itself, Norm is 0/0 -> 0.
    assert torch.equal(merge(torch.zeros(1), [torch.ones(1)]), torch.zeros(1))


# ---------------------------------------------------------------- whole checkpoints

def test_whole_checkpoint_through_a_recipe(tmp_path, model_family):
    base, fts = model_family("llama", 3)
    recipe = {"merge_method": "pcb", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p)} for p in fts], "parameters": {"density": 0.2, "lambda": 0.9}}
    dry = mergesmith.merge(recipe, tmp_path / "dry", dry_run=True)
    assert dry.out_dir is None and not (tmp_path / "dry").exists()
    assert all(t.params["density"] == 0.2 for t in dry.plan.tensors)
    mergesmith.merge(recipe, tmp_path / "out")
    ours = load_state(tmp_path / "out")
    b, ms = load_state(base), [load_state(p) for p in fts]
    assert sorted(ours) == sorted(b)
    for name, ref_base in b.items():
        ref = ref_pcb_tensor(ref_base, [m[name] for m in ms], 0.2, lam=0.9)
        assert rel_diff(ours[name], ref) < 1e-6, name
