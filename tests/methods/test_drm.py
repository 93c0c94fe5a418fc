"""DRM (Decom-Renorm-Merge): cases worked by hand from the paper's equations, properties,
and agreement with a direct transcription of the authors' ``drm/_decom_renorm_merge.py``
(github.com/yophis/decom-renorm-merge), kept below apart from the library code.
"""

from __future__ import annotations

import pytest
import torch

import mergesmith
from mergesmith.methods import TensorGroup, get_method
from tiny_models import finetuned_tensors as finetunes, load_state, max_relative_difference as rel_diff

DEFAULTS = {"stack": "vertical", "density": 0.2, "include_embeddings": False}


def merge(base, models, weights=None, vocab=False, **params):
    weights = weights or [1.0] * len(models)
    return get_method("drm").fn(TensorGroup(
        name="t", tensors=[base, *models], params={**DEFAULTS, **params},
        model_params=[{}] + [{"weight": w} for w in weights], base_index=0, vocab=vocab))


# ---------------------------------------------------------------- reference transcription
# Unoptimized, line by line after the authors' left_drm / right_drm / drm_merging (their
# default flags: disjoint mean, sign resolution by mass, no trim of other parameters).

def ref_resolve_sign(tensors):
    signs = torch.sign(tensors.sum(dim=0, keepdim=True))
    majority = signs.sum().sign()
    signs[signs == 0] = majority
    return tensors.masked_fill(tensors.sign() != signs, 0.0)


def ref_disjoint_average(tensors):
    divisor = torch.clamp(torch.count_nonzero(tensors, dim=0), min=1.0)
    return tensors.sum(dim=0) / divisor


def ref_zero_out_non_topk(tensor, ratio):
    if ratio == 1.0:
        return tensor
    shape = tensor.shape
    flat = tensor.reshape(-1).clone()
    k = len(flat) - round(len(flat) * ratio)
    kth = flat.abs().kthvalue(k=k).values.item()
    flat[flat.abs() < kth] = 0.0
    return flat.reshape(shape)


def ref_left_drm(weights, drop_rate):
    t, n, m = weights.shape
    u, s, vh = torch.linalg.svd(weights.reshape(-1, m), full_matrices=False)
    r = int((s > s.max().item() * 1e-2).sum().item())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks, scales = [], []
    for i in range(t):
        block = u[i * n:(i + 1) * n].clone()
        norms = torch.linalg.vector_norm(block, ord=2, dim=0, keepdim=True)
        blocks.append(block / norms)
        scales.append(s * norms.squeeze(0))
    us = torch.stack(scales).unsqueeze(-2) * ref_zero_out_non_topk(torch.stack(blocks), 1 - drop_rate)
    return ref_disjoint_average(ref_resolve_sign(us)) @ vh


def ref_right_drm(weights, drop_rate):
    t, n, m = weights.shape
    u, s, vh = torch.linalg.svd(weights.permute(1, 0, 2).reshape(n, -1), full_matrices=False)
    r = int((s > s.max().item() * 1e-2).sum().item())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks, scales = [], []
    for i in range(t):
        block = vh[:, i * m:(i + 1) * m].clone()
        norms = torch.linalg.vector_norm(block, ord=2, dim=1, keepdim=True)
        blocks.append(block / norms)
        scales.append(s * norms.squeeze(1))
    svh = torch.stack(scales).unsqueeze(-1) * ref_zero_out_non_topk(torch.stack(blocks), 1 - drop_rate)
    return u @ ref_disjoint_average(ref_resolve_sign(svh))


def ref_drm_tensor(base, models, density, stack="vertical", matrix=True):
    deltas = torch.stack([m - base for m in models])
    if matrix and base.dim() == 2:
        fn = ref_left_drm if stack == "vertical" else ref_right_drm
        return base + fn(deltas, 1 - density)
    return base + ref_disjoint_average(ref_resolve_sign(deltas))


# ---------------------------------------------------------------- hand-computed cases

def test_orthogonal_tasks_are_kept_whole():
    # tau_1 = [3, 0], tau_2 = [0, 4] (1 x 2 each). Stacked: diag(3, 4) = U S V^T with
    # s = (4, 3), U = V = [[0, 1], [1, 0]]. Block 1 is U's row [0, 1]: column norms (0, 1),
    # so s_1 = (0, 3) and the zero-norm column stays 0; block 2: s_2 = (4, 0). Coordinates
    # C_1 = (0, 3), C_2 = (4, 0); no conflicts; disjoint mean (4, 3); C V^T = [3, 4].
    base = torch.zeros(1, 2)
    out = merge(base, [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])], density=1.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0]]))
    assert torch.isfinite(out).all()


def test_identical_tasks_give_that_task_vector():
    # [tau; tau] = ([U0; U0] / sqrt 2)(sqrt 2 S) V^T: each block's columns have norm
    # 1/sqrt 2, so renormalized C_t = U0 (sqrt 2 S / sqrt 2) = U0 S for both, their mean is
    # U0 S and the merge is tau itself (density 1, nothing pruned), not 2 tau.
    tau = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    for stack in ("vertical", "horizontal"):
        out = merge(torch.zeros(2, 3), [tau, tau.clone()], density=1.0, stack=stack)
        torch.testing.assert_close(out, tau)


def test_vectors_take_sign_election_and_disjoint_mean():
    # Sums (4, -1, 0.5, 0): elected signs (+, -, +, ?); the tie takes the sign of the sum of
    # elected signs, +1. Agreeing entries: (1, 3) -> 2; (-2) -> -2; (0.5) -> 0.5; (1) -> 1.
    t1 = torch.tensor([1.0, -2.0, 0.5, 1.0])
    t2 = torch.tensor([3.0, 1.0, 0.0, -1.0])
    out = merge(torch.zeros(4), [t1, t2])
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.5, 1.0]))


def test_pruning_keeps_round_n_density_plus_the_threshold_entry():
    # One 4 x 1 task vector: U is tau / |tau| (4 entries), renormalized the same; density
    # 0.5 -> k = 4 - 2 = 2, the 2nd smallest |u| is the threshold and >= keeps 3 entries.
    tau = torch.tensor([[1.0], [-2.0], [3.0], [4.0]])
    out = merge(torch.zeros(4, 1), [tau], density=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.0], [-2.0], [3.0], [4.0]]))


# ---------------------------------------------------------------- against the authors' algorithm

@pytest.mark.parametrize("stack", ["vertical", "horizontal"])
@pytest.mark.parametrize("shape,k,density", [((12, 8), 3, 0.2), ((8, 12), 2, 0.5), ((16, 16), 4, 0.1),
                                             ((6, 20), 3, 0.9)])
def test_matches_authors_algorithm(stack, shape, k, density):
    base, models = finetunes(shape, k, seed=shape[0] + k)
    ours = merge(base, models, density=density, stack=stack)
    ref = ref_drm_tensor(base, models, density, stack)
    assert rel_diff(ours, ref) < 1e-5


def test_low_rank_tasks_trim_the_null_space_as_the_authors():
    # Rank-2 task vectors: the stacked matrix has tiny singular values that the 1% cut drops.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 9, generator=g)
    models = [base + torch.randn(10, 2, generator=g) @ torch.randn(2, 9, generator=g) for _ in range(3)]
    for stack in ("vertical", "horizontal"):
        assert rel_diff(merge(base, models, stack=stack, density=0.3),
                        ref_drm_tensor(base, models, 0.3, stack)) < 1e-5


def test_one_dimensional_and_embeddings_take_the_other_parameters_path():
    base, models = finetunes((7,), 3, seed=1)
    assert rel_diff(merge(base, models), ref_drm_tensor(base, models, 0.2, matrix=False)) < 1e-6
    base, models = finetunes((10, 6), 3, seed=2)
    fallback = ref_drm_tensor(base, models, 0.2, matrix=False)
    assert rel_diff(merge(base, models, vocab=True), fallback) < 1e-6
    decomposed = merge(base, models, vocab=True, include_embeddings=True)
    assert rel_diff(decomposed, ref_drm_tensor(base, models, 0.2)) < 1e-5
    assert (decomposed - fallback).abs().max() > 1e-3


# ---------------------------------------------------------------- properties

def test_one_model_with_density_one_gives_its_task_vector_back():
    # Well-conditioned tau: every singular value is above 1% of the largest, so nothing is cut.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 5, generator=g))
    tau = q @ torch.diag(torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])) @ torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    for stack in ("vertical", "horizontal"):
        out = merge(base, [base + tau], density=1.0, stack=stack)
        torch.testing.assert_close(out - base, tau, atol=1e-6, rtol=1e-5)


def test_invariant_to_the_signs_the_svd_picks(monkeypatch):
    base, models = finetunes((10, 7), 3, seed=5)
    expected = {s: merge(base, models, stack=s, density=0.3) for s in ("vertical", "horizontal")}
    svd = torch.linalg.svd

    def flipped_svd(a, full_matrices=True):
        u, s, vh = svd(a, full_matrices=full_matrices)
        signs = torch.where(torch.arange(s.numel()) % 2 == 0, -1.0, 1.0)
        return u * signs, s, vh * signs[:, None]

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    for stack, out in expected.items():
        assert rel_diff(merge(base, models, stack=stack, density=0.3), out) < 1e-5


def test_weight_scales_the_task_vector_before_decomposition():
    base, models = finetunes((8, 6), 3, seed=7)
    weights = [0.5, 1.0, 2.0]
    scaled = [base + w * (m - base) for m, w in zip(models, weights)]
    for shape_base, shape_models in ((base, models), (base[0], [m[0] for m in models])):
        sb = [shape_base + w * (m - shape_base) for m, w in zip(shape_models, weights)]
        assert rel_diff(merge(shape_base, shape_models, weights=weights), merge(shape_base, sb)) < 1e-6
    # DRM is positively homogeneous: a common weight c scales the merged task vector by c.
    out = merge(base, models, weights=[3.0] * 3)
    assert rel_diff(out - base, 3 * (merge(base, models) - base)) < 1e-5
    assert rel_diff(merge(base, models, weights=weights), merge(base, scaled)) < 1e-6


def test_zero_task_vector_does_not_make_nan():
    base, models = finetunes((6, 4), 2, seed=9)
    for stack in ("vertical", "horizontal"):
        out = merge(base, [*models, base.clone()], stack=stack, density=0.5)
        assert torch.isfinite(out).all()
        assert torch.equal(merge(base, [base.clone()], stack=stack), base)


# ---------------------------------------------------------------- whole checkpoints

def test_whole_checkpoint_through_a_recipe(tmp_path, model_family):
    base, fts = model_family("llama", 3)
    recipe = {"merge_method": "drm", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 1.0, 1.0])],
              "parameters": {"density": 0.3, "stack": "horizontal"}}
    dry = mergesmith.merge(recipe, tmp_path / "dry", dry_run=True)
    assert dry.out_dir is None and not (tmp_path / "dry").exists()
    assert dry.plan.recipe.method.name == "drm"
    assert all(t.params["stack"] == "horizontal" for t in dry.plan.tensors)
    mergesmith.merge(recipe, tmp_path / "out")
    ours = load_state(tmp_path / "out")
    b, ms = load_state(base), [load_state(p) for p in fts]
    assert sorted(ours) == sorted(b)
    for name, ref_base in b.items():
        matrix = ref_base.dim() == 2 and name not in ("model.embed_tokens.weight", "lm_head.weight")
        ref = ref_drm_tensor(ref_base, [m[name] for m in ms], 0.3, "horizontal", matrix=matrix)
        assert rel_diff(ours[name], ref) < 1e-5, name


def test_bfloat16_inputs_are_decomposed_in_float32():
    base, models = finetunes((8, 6), 3, seed=11)
    out = merge(base.bfloat16(), [m.bfloat16() for m in models], density=0.5)
    assert out.dtype == torch.bfloat16
    ref = ref_drm_tensor(base.bfloat16().float(), [m.bfloat16().float() for m in models], 0.5)
    assert rel_diff(out.float(), ref) < 1e-2
