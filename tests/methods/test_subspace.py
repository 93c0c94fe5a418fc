"""Subspace merges (tsv_m, iso_c, iso_cts, star, cart) at the method level: hand-computed cases
from the papers' equations, properties, parity with FusionBench 0.2.33 (TSV-M, Iso-C, Iso-CTS)
and with direct transcriptions of the authors' published algorithms (STAR, CART), on single
tensors and on whole tiny checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fusionbench_iso_c
from fusion_bench.method.isotropic_merging.iso_utils import iso_cts as fusionbench_iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

import mergesmith
from mergesmith.methods import TensorGroup, get_method
from mergesmith.methods.subspace import iso_cts_split, polar_factor, singular_triplets
from tiny_models import load_state

METHODS = ["tsv_m", "iso_c", "iso_cts", "star", "cart"]
T = torch.tensor


def run(name, base, models, weights=None, vocab=False, disposable=False, **params):
    """Run a method as the engine would: defaults filled in, base first in recipe order."""
    spec = get_method(name)
    full = {p.name: p.default for p in spec.params if not p.per_model}
    full.update(params)
    weights = weights or [1.0] * len(models)
    group = TensorGroup(name="t", tensors=[base, *models], params=full,
                        model_params=[{}] + [{"weight": w} for w in weights], base_index=0,
                        disposable=disposable, vocab=vocab)
    return spec.fn(group)


def random_inputs(n_models=3, shape=(24, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n_models)]


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


# ---------------------------------------------------------------- the linear algebra pieces

@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_singular_triplets_match_svd(shape):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    u, s, vh = singular_triplets(a)
    _, s_ref, _ = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=0)
    assert torch.allclose((u * s) @ vh, a.double(), atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(min(shape), dtype=torch.float64), atol=1e-12)
    u3, s3, vh3 = singular_triplets(a, 3)
    assert u3.shape == (shape[0], 3) and vh3.shape == (3, shape[1])
    assert torch.allclose((u3 * s3) @ vh3, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)


def test_singular_triplets_zero_below_the_float32_floor():
    # Rank 2 in a 6x5 matrix: the three null directions come back as zero triplets, not
    # as arbitrary unit vectors (which an SVD would pick).
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)
    u, s, vh = singular_triplets(a)
    assert (s[2:] == 0).all() and (u[:, 2:] == 0).all() and (vh[2:] == 0).all()
    # The polar factor is then the partial isometry on the range.
    p = polar_factor(a)
    assert torch.allclose(p @ p.T @ a.double(), a.double(), atol=1e-10)
    assert torch.linalg.matrix_rank(p).item() == 2


def test_polar_factor_hand_computed():
    # Unit vectors at 0 and 45 degrees: the nearest orthonormal pair sits symmetrically about
    # their bisector (22.5 degrees), at -22.5 and 67.5 degrees.
    a = T([[1.0, math.sqrt(0.5)], [0.0, math.sqrt(0.5)]])
    c, s = math.cos(math.radians(22.5)), math.sin(math.radians(22.5))
    expected = T([[c, s], [-s, c]], dtype=torch.float64)
    assert torch.allclose(polar_factor(a), expected, atol=1e-12)


# ---------------------------------------------------------------- hand-computed cases

def test_tsv_m_hand_computed():
    # tau_1 = 3 e1 e1^T, tau_2 = 2 a e2^T with a at 45 degrees: k = 2 // 2 = 1 triplet each,
    # U = [e1, a] is orthogonalized to the pair at -22.5 and 67.5 degrees, V = [e1, e2] = I.
    base = T([[1.0, 0.0], [0.0, 1.0]])
    a = math.sqrt(0.5)
    tau1 = T([[3.0, 0.0], [0.0, 0.0]])
    tau2 = T([[0.0, 2 * a], [0.0, 2 * a]])
    c, s = math.cos(math.radians(22.5)), math.sin(math.radians(22.5))
    merged_tv = T([[3 * c, 2 * s], [-3 * s, 2 * c]])
    out = run("tsv_m", base, [base + tau1, base + tau2], **{"lambda": 0.5})
    assert torch.allclose(out, base + 0.5 * merged_tv, atol=1e-6)


def test_iso_c_hand_computed():
    # M = tau_1 + tau_2 = [[0, 3], [1, 0]]: sigma = (3, 1), mean 2, polar factor [[0, 1], [1, 0]].
    base = torch.zeros(2, 2)
    out = run("iso_c", base, [T([[0.0, 3.0], [0.0, 0.0]]), T([[0.0, 0.0], [1.0, 0.0]])])
    assert torch.allclose(out, T([[0.0, 2.0], [2.0, 0.0]]), atol=1e-6)
    # 3x2: M = [[3, 0], [0, 1], [0, 0]] -> 2 * [[1, 0], [0, 1], [0, 0]]; lambda scales it.
    base = torch.ones(3, 2)
    models = [base + T([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), base + T([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])]
    out = run("iso_c", base, models, **{"lambda": 0.5})
    assert torch.allclose(out, base + T([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), atol=1e-6)


def test_iso_cts_hand_computed():
    # r = 4, T = 2, f = 0.5: two common directions, one per task.
    # M = diag(4, 3, 1, 2.5): common e1 (4), e2 (3). Outside them tau_1 keeps e3 (1; its 0.5 on
    # e4 is its second direction, dropped) and tau_2 keeps e4 (2). Spectrum (4, 3, 1, 2) -> mean
    # 2.5 on the whole basis. Iso-C would give mean(4, 3, 1, 2.5) = 2.625 instead.
    tau1, tau2 = torch.diag(T([4.0, 0.0, 1.0, 0.5])), torch.diag(T([0.0, 3.0, 0.0, 2.0]))
    base = torch.zeros(4, 4)
    assert iso_cts_split(4, 2, 0.5) == (2, 1)
    out = run("iso_cts", base, [tau1, tau2], common_space_fraction=0.5)
    assert torch.allclose(out, 2.5 * torch.eye(4), atol=1e-6)
    assert torch.allclose(run("iso_c", base, [tau1, tau2]), 2.625 * torch.eye(4), atol=1e-6)


def test_iso_cts_split_follows_the_authors_rounding():
    assert iso_cts_split(16, 3, 0.8) == (16 - 3, 1)  # int(12.8) = 12, round(4 / 3) = 1
    assert iso_cts_split(40, 3, 0.8) == (40 - 9, 3)  # round(8 / 3) = 3
    assert iso_cts_split(10, 4, 1.0) == (10, 0)
    assert iso_cts_split(7, 4, 0.0) == (3, 1)  # round(7 / 4) * 4 = 8 > 7: floor instead


def test_star_hand_computed():
    # sigma = (5, 3, 2), nuclear norm 10. eta = 40: the first value reaches 4, kept and
    # rescaled to 10. eta = 60: two values reach 6, rescaled by 10 / 8 to (6.25, 3.75).
    tau1 = torch.diag(T([5.0, 3.0, 2.0]))
    tau2 = torch.diag(T([0.0, 0.0, 4.0]))  # rank 1: STAR keeps it as it is
    base = torch.zeros(3, 3)
    out = run("star", base, [tau1, tau2], eta=40.0)
    assert torch.allclose(out, torch.diag(T([10.0, 0.0, 4.0])) / 2, atol=1e-6)
    out = run("star", base, [tau1, tau2], eta=60.0, **{"lambda": 2.0})
    assert torch.allclose(out, torch.diag(T([6.25, 3.75, 4.0])), atol=1e-6)


def test_cart_hand_computed():
    # tau = diag(6, 0), diag(0, 3), diag(3, 0): tau_avg = diag(3, 1). Centered: diag(3, -1),
    # diag(-3, 2), diag(0, -1); rank 1 (rank_ratio 0.5 of r = 2) keeps diag(3, 0), diag(-3, 0),
    # diag(0, -1); their sum is diag(0, -1). Merged: base + diag(3, 1) + lambda * diag(0, -1).
    base = torch.ones(2, 2)
    models = [base + torch.diag(T([6.0, 0.0])), base + torch.diag(T([0.0, 3.0])), base + torch.diag(T([3.0, 0.0]))]
    out = run("cart", base, models, rank_ratio=0.5)  # default lambda 2.0
    assert torch.allclose(out, base + torch.diag(T([3.0, -1.0])), atol=1e-6)
    out = run("cart", base, models, rank_ratio=0.5, **{"lambda": 1.0})
    assert torch.allclose(out, base + torch.diag(T([3.0, 0.0])), atol=1e-6)
    # rank_ratio 0 is plain averaging.
    assert torch.allclose(run("cart", base, models, rank_ratio=0.0), base + torch.diag(T([3.0, 1.0])), atol=1e-6)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("name,params", [("tsv_m", {}), ("star", {"eta": 100.0}), ("cart", {}),
                                         ("cart", {"rank_ratio": 0.3})])
def test_one_model_gives_its_task_vector_back(name, params):
    base, (model,) = random_inputs(1)
    assert rel_diff(run(name, base, [model], **params), model) < 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_equivariant_under_orthogonal_maps_and_sign_flips(name):
    # f(Q tau_t R) = Q f(tau_t) R: the result depends on the singular subspaces only, not on
    # the bases (or signs) a decomposition picks. Sign flips are the diagonal case.
    base, models = random_inputs(3, (10, 6))
    q, r = random_orthogonal(10, 3), random_orthogonal(6, 4)
    flips = torch.diag(T([1.0, -1.0, -1.0, 1.0, -1.0, 1.0]))
    out = run(name, base, models)
    for left, right in ((q, r), (torch.eye(10), flips)):
        moved = run(name, left @ base @ right, [left @ m @ right for m in models])
        assert rel_diff(moved, left @ out @ right) < 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_weight_scales_the_task_vector_before_decomposition(name):
    base, models = random_inputs(3)
    weights = [0.5, 2.0, -1.0]
    weighted = run(name, base, models, weights=weights)
    prescaled = run(name, base, [base + w * (m - base) for m, w in zip(models, weights)])
    assert rel_diff(weighted, prescaled) < 1e-6
    assert rel_diff(weighted, run(name, base, models)) > 1e-2


@pytest.mark.parametrize("name", METHODS)
def test_lambda_scales_the_merged_task_vector(name):
    # CART scales only the low-rank sum on top of the average; the others the whole delta.
    base, models = random_inputs(3)
    zero, one = (run(name, base, models, **{"lambda": lam}) for lam in (0.0, 1.0))
    if name == "cart":
        assert rel_diff(zero, base + sum(m - base for m in models) / 3) < 1e-6
    else:
        assert torch.equal(zero, base)
    assert rel_diff(run(name, base, models, **{"lambda": 0.3}) - zero, 0.3 * (one - zero)) < 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_one_dimensional_fallback(name):
    base, models = random_inputs(3, (16,))
    weights = [1.0, 0.5, 2.0]
    mean_tv = sum(w * (m - base) for m, w in zip(models, weights)) / 3
    out = run(name, base, models, weights=weights, **{"lambda": 0.7})
    # CART's centered task vectors sum to zero outside the decomposition: theta_avg, no lambda.
    expected = base + (mean_tv if name == "cart" else 0.7 * mean_tv)
    assert rel_diff(out, expected) < 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_vocabulary_tensors_fall_back_unless_included(name):
    base, models = random_inputs(3, (20, 8))
    mean_tv = sum(m - base for m in models) / 3
    plain = run(name, base, models, vocab=True, **{"lambda": 1.0})
    assert rel_diff(plain, base + mean_tv) < 1e-6
    included = run(name, base, models, vocab=True, include_embeddings=True)
    assert torch.equal(included, run(name, base, models))
    assert rel_diff(included, plain) > 1e-3


@pytest.mark.parametrize("name", METHODS)
def test_inputs_untouched_unless_disposable(name):
    base, models = random_inputs(3)
    copies = [m.clone() for m in (base, *models)]
    out = run(name, base, models)
    assert all(torch.equal(a, b) for a, b in zip(copies, (base, *models)))
    assert torch.allclose(run(name, base, [m.clone() for m in models], disposable=True), out, atol=1e-7)


@pytest.mark.parametrize("name", METHODS)
def test_keeps_the_compute_dtype(name):
    base, models = random_inputs(2)
    out = run(name, base.bfloat16(), [m.bfloat16() for m in models])
    assert out.dtype == torch.bfloat16
    assert rel_diff(out.float(), run(name, base, models)) < 2e-2


def test_tsv_m_more_tasks_than_dimensions_keeps_the_base():
    base, models = random_inputs(3, (4, 2))
    assert torch.equal(run("tsv_m", base, models), base)


def test_iso_cts_with_full_common_space_is_iso_c():
    base, models = random_inputs(3)
    assert rel_diff(run("iso_cts", base, models, common_space_fraction=1.0), run("iso_c", base, models)) < 1e-6


def iso_cts_equations(deltas, f):
    """Iso-CTS as its equations read: project, decompose, concatenate, polar factors (explicit)."""
    total = sum(d.double() for d in deltas)
    common, per_task = iso_cts_split(min(total.shape), len(deltas), f)
    u_c, s_c, vh_c = singular_triplets(total, common)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    for d in deltas:
        tau = d.double()
        u, s, vh = singular_triplets(tau - u_c @ (u_c.T @ tau), per_task, torch.linalg.matrix_norm(tau))
        us.append(u), ss.append(s), vhs.append(vh)
    return polar_factor(torch.cat(us, 1)) * torch.cat(ss).mean() @ polar_factor(torch.cat(vhs, 0))


@pytest.mark.parametrize("shape", [(12, 30), (20, 20), (30, 12)])
@pytest.mark.parametrize("f", [0.8, 0.5, 0.0])
def test_iso_cts_block_algebra_is_its_equations(shape, f):
    # The library forms polar([U_c, U_1..U_T]) blockwise and, for m <= n, the projected task
    # vectors in the complement basis of M M^T; the result is the equations' to float64 rounding.
    base, models = random_inputs(3, shape, seed=5)
    expected = iso_cts_equations([m - base for m in models], f)
    out = run("iso_cts", base, models, common_space_fraction=f)
    assert rel_diff(out - base, expected.float()) < 1e-6


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_iso_cts_task_directions_below_the_inputs_floor_are_zero(shape):
    # Rank-2 task vectors (LoRA-like): their sum spans all three ranges, so what each leaves
    # outside the common subspace is rounding noise. It contributes no direction: the merged
    # task vector has the sum's rank, 6, where picking d noise directions per task (what an SVD
    # of the projection does) would add 3 * d more.
    g = torch.Generator().manual_seed(9)
    m, n = shape
    deltas = [torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) for _ in range(3)]
    base = torch.zeros(shape)
    assert iso_cts_split(12, 3, 0.8)[1] == 1
    merged = run("iso_cts", base, deltas).double()
    s = torch.linalg.svdvals(merged)
    assert (s[6:] < 1e-6 * s[0]).all() and (s[:6] > 0.1 * s[0]).all()
    assert rel_diff(merged.float(), iso_cts_equations(deltas, 0.8).float()) < 1e-6


def test_star_zero_task_vector_stays_zero():
    base, models = random_inputs(1)
    assert torch.equal(run("star", base, [base.clone()]), base)


# ---------------------------------------------------------------- parity with FusionBench

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def compare_states(ours: dict, theirs: dict) -> float:
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for k, ref in theirs.items():
        assert ours[k].shape == ref.shape and ours[k].dtype == ref.dtype, k
        worst = max(worst, rel_diff(ours[k], ref))
    return worst


def fusionbench_merge(name, base_state, model_states, exclude_keys=(), lam=1.0, dtype=torch.float32, **kw):
    """FusionBench's merged model: base + lambda * merged task vector, as its algorithm classes
    do (on CPU), with its functions run in ``dtype`` and the result returned in float32."""
    base_state = {k: v.to(dtype) for k, v in base_state.items()}
    tvs = [{k: m[k].to(dtype) - base_state[k] for k in base_state} for m in model_states]
    if name == "tsv_m":
        merged = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=list(exclude_keys), accelerator="cpu")
    elif name == "iso_c":
        merged = fusionbench_iso_c(tvs, accelerator="cpu", exclude_keys=list(exclude_keys))
    else:
        merged = fusionbench_iso_cts(tvs, kw["common_space_fraction"], accelerator="cpu",
                                     exclude_keys=list(exclude_keys))
    return {k: (base_state[k] + lam * merged[k]).float() for k in base_state}


def assert_fusionbench_parity(ours: dict, name, base_state, model_states, **kw):
    """Our float32 result against FusionBench's own code, two ways.

    1. FusionBench run in float64 on the same float32 inputs (its algorithm, exactly): below
       1e-5, in practice a few 1e-7, i.e. float32 output rounding.
    2. FusionBench run in float32, as its programs do: its float32 SVDs are themselves off from
       their own float64 run by up to ~1e-5 on these tensors (truncations at close singular
       values), while ours stay at float32 rounding; so we require to be within 1e-5 of it, or
       no farther from it than it is from the exact result (plus 1e-6).
    """
    exact = fusionbench_merge(name, base_state, model_states, dtype=torch.float64, **kw)
    assert compare_states(ours, exact) < 1e-5
    theirs = fusionbench_merge(name, base_state, model_states, **kw)
    their_error = compare_states(theirs, exact)
    assert compare_states(ours, theirs) < max(1e-5, their_error + 1e-6)


FUSIONBENCH_CASES = [("tsv_m", {}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.8}),
                     ("iso_cts", {"common_space_fraction": 0.5})]


@pytest.mark.parametrize("name,params", FUSIONBENCH_CASES)
@pytest.mark.parametrize("shape,n_models", [((24, 16), 3), ((16, 40), 3), ((20, 20), 2), ((33, 9), 4)])
def test_matches_fusionbench_on_single_tensors(name, params, shape, n_models, capsys):
    base, models = random_inputs(n_models, shape, seed=shape[0])
    ours = run(name, base, models, **{"lambda": 0.8}, **params)
    # Compared on the merged task vector, the part the methods compute (base set to zero).
    zero = torch.zeros_like(base)
    assert_fusionbench_parity({"w": ours - base}, name, {"w": zero}, [{"w": m - base} for m in models],
                              lam=0.8, **params)


def family_recipe(name, base, fts, **params):
    return {"merge_method": name, "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(p)} for p in fts], "parameters": params}


@pytest.mark.parametrize("name,params", FUSIONBENCH_CASES[:3])
def test_matches_fusionbench_on_whole_checkpoints(name, params, model_family, tmp_path, capsys):
    base, fts = model_family("llama", 3)
    mergesmith.merge(family_recipe(name, base, fts, **{"lambda": 0.9}, **params), tmp_path / "ours",
                     progress=False)
    assert_fusionbench_parity(load_state(tmp_path / "ours"), name, load_state(base),
                              [load_state(p) for p in fts], exclude_keys=VOCAB_KEYS, lam=0.9, **params)


# ---------------------------------------------------------------- STAR and CART: the authors' algorithms

def star_reference(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """STAR on one matrix, transcribed from the authors' algorithm (IBM/STAR merger/STAR.py):
    full SVD (in float64, so that the reference is exact; the authors use float32), smallest rank whose singular values reach eta% of the nuclear norm, rescale the
    kept ones to the whole nuclear norm."""
    u, s, vt = torch.linalg.svd(tau.double(), full_matrices=False)
    total = s.sum()
    rank = 0
    running = 0.0
    while running < total * eta / 100:
        running += s[rank]
        rank += 1
    rank = max(rank, 1)
    kept = s[:rank] * (total / s[:rank].sum())
    return (u[:, :rank] @ torch.diag(kept) @ vt[:rank]).to(tau.dtype)


def star_reference_merge(base_state, model_states, decomposed, eta, lam):
    """The authors' runner: STAR each task vector's matrices, simple average (alpha = 1/T)."""
    out = {}
    for k, b in base_state.items():
        tvs = [m[k] - b for m in model_states]
        if k in decomposed:
            tvs = [star_reference(tv, eta) for tv in tvs]
        out[k] = b + lam * sum(tvs) / len(tvs)
    return out


def cart_reference_merge(base_state, model_states, decomposed, rank_ratio, prior):
    """CART as the authors' StaticMergeModule merges it (JH-GEECS/CART src/merging.py):
    theta_avg = theta_0 + (1/T) sum tau_t; every tensor's centered vector theta_t - theta_avg,
    truncated (float64 SVD) to max(1, int(rank_ratio * r)) directions for the decomposed matrices; the merged
    model is theta_avg + prior * sum of them."""
    out = {}
    for k, b in base_state.items():
        theta_avg = b + sum(m[k] - b for m in model_states) / len(model_states)
        total = torch.zeros_like(b)
        for m in model_states:
            centered = m[k] - theta_avg
            if k in decomposed:
                u, s, vt = torch.linalg.svd(centered.double(), full_matrices=False)
                rank = max(1, int(rank_ratio * s.shape[0]))
                centered = ((u[:, :rank] * s[:rank]) @ vt[:rank]).to(b.dtype)
            total = total + centered
        out[k] = theta_avg + prior * total
    return out


@pytest.mark.parametrize("eta", [10.0, 40.0, 75.0])
@pytest.mark.parametrize("shape", [(24, 16), (12, 30)])
def test_star_matches_the_authors_algorithm(eta, shape):
    base, models = random_inputs(3, shape, seed=5)
    theirs = star_reference_merge({"w": base}, [{"w": m} for m in models], {"w"}, eta, 0.6)["w"]
    assert rel_diff(run("star", base, models, eta=eta, **{"lambda": 0.6}) - base, theirs - base) < 1e-5


@pytest.mark.parametrize("rank_ratio", [0.12, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(24, 16), (12, 30)])
def test_cart_matches_the_authors_algorithm(rank_ratio, shape):
    base, models = random_inputs(3, shape, seed=6)
    theirs = cart_reference_merge({"w": base}, [{"w": m} for m in models], {"w"}, rank_ratio, 2.0)["w"]
    ours = run("cart", base, models, rank_ratio=rank_ratio)
    assert rel_diff(ours - base, theirs - base) < 1e-5


@pytest.mark.parametrize("name", ["star", "cart"])
def test_star_and_cart_match_the_authors_on_whole_checkpoints(name, model_family, tmp_path):
    base, fts = model_family("llama", 3)
    params = {"eta": 40.0, "lambda": 0.9} if name == "star" else {"rank_ratio": 0.25, "lambda": 1.5}
    mergesmith.merge(family_recipe(name, base, fts, **params), tmp_path / "ours", progress=False)
    base_state = load_state(base)
    decomposed = {k for k, v in base_state.items() if v.dim() == 2 and k not in VOCAB_KEYS}
    states = [load_state(p) for p in fts]
    if name == "star":
        theirs = star_reference_merge(base_state, states, decomposed, 40.0, 0.9)
    else:
        theirs = cart_reference_merge(base_state, states, decomposed, 0.25, 1.5)
    assert compare_states(load_state(tmp_path / "ours"), theirs) < 1e-5
