"""model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl and passthrough.

Per method: a case worked by hand from the method's equations, properties, parity with
mergekit 0.1.5's own kernel on the same float32 tensors, and parameter checks.
"""

import math

import pytest
import torch

from mergesmith.methods import BasePolicy, TensorGroup, get_method

mergekit_methods = pytest.importorskip("mergekit.merge_methods")

METHODS = ["model_stock", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough"]
DEFAULTS = {
    "model_stock": {"filter_wise": False},
    "sce": {"select_topk": 1.0, "int8_mask": False},
    "nearswap": {"t": 0.01},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}


def merge(name, base, others, **params):
    """Run one of our methods with the base first, then the other models."""
    return get_method(name).fn(TensorGroup(
        name="t", tensors=[base, *others], params={**DEFAULTS[name], **params},
        model_params=[{} for _ in range(len(others) + 1)], base_index=0,
        generator=torch.Generator().manual_seed(0)))


def reference(name, base, others, **params):
    return mergekit_methods.merge_tensors([base, *others], name, base_index=0, parameters=params)


def assert_parity(ours, theirs):
    # Max relative difference 1e-5, with an absolute slack at float32 rounding of the
    # tensor's scale for entries that are ~0.
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7 * theirs.abs().max().item())


def finetunes(shape, k, seed, scale=0.01):
    """A base and k fine-tunes sharing part of their update, so angles are not ~90 deg."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = scale * torch.randn(shape, generator=g)
    return base, [base + common + scale * torch.randn(shape, generator=g) for _ in range(k)]


def sparse_finetunes(shape, k, seed, density=0.3):
    """RL-style updates: each model changes a random ~30% of the entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.where(torch.rand(shape, generator=g) < density,
                                     0.01 * torch.randn(shape, generator=g), torch.zeros(()))
                  for _ in range(k)]


# ---------------------------------------------------------------- declarations


def test_parameters_and_defaults_match_mergekit():
    for name in ["model_stock", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]:
        ours = get_method(name)
        theirs = mergekit_methods.get(name).spec
        assert {p.name for p in ours.params} == {p.name for p in theirs.parameters}, name
        for p in theirs.parameters:
            if p.required:
                assert ours.param(p.name).required, (name, p.name)
            else:
                assert ours.param(p.name).default == p.default, (name, p.name)
        assert ours.base is BasePolicy.REQUIRED
    # passthrough: mergekit's scale defaults to None (no scaling), ours to 1.0.
    spec = get_method("passthrough")
    assert spec.passthrough and spec.base is BasePolicy.IGNORED
    assert (spec.min_models, spec.max_models) == (1, 1)
    assert spec.param("scale").per_model and spec.param("scale").default == 1.0


def test_model_counts_match_mergekit_contracts():
    # mergekit counts the base among min/max_inputs; we count models besides it.
    for name, lo, hi in [("model_stock", 2, None), ("nearswap", 1, 1), ("arcee_fusion", 1, 1)]:
        contract = mergekit_methods.get(name).spec.contract
        spec = get_method(name)
        assert (spec.min_models, spec.max_models) == (lo, hi)
        assert contract.min_inputs - 1 == lo
        assert (contract.max_inputs - 1 if contract.max_inputs else None) == hi


@pytest.mark.parametrize("name, param, bad", [
    ("sce", "select_topk", 0.0), ("sce", "select_topk", 1.5), ("sce", "select_topk", -0.1),
    ("nearswap", "t", -0.01), ("ram", "epsilon", -1e-5), ("ramplus_tl", "epsilon", -1.0),
    ("ramplus_tl", "r", -0.1), ("ramplus_tl", "alpha", -0.2),
    ("passthrough", "scale", float("nan")), ("passthrough", "scale", float("inf")),
])
def test_out_of_range_parameters_refused(name, param, bad):
    assert get_method(name).param(param).check(bad) is not None


@pytest.mark.parametrize("name, param, good", [
    ("sce", "select_topk", 1.0), ("sce", "select_topk", 0.01), ("nearswap", "t", 0.0),
    ("ram", "epsilon", 0.0), ("ramplus_tl", "alpha", 0.0), ("passthrough", "scale", -2.0),
])
def test_in_range_parameters_accepted(name, param, good):
    assert get_method(name).param(param).check(good) is None


def test_nearswap_t_is_required():
    assert get_method("nearswap").param("t").required


@pytest.mark.parametrize("name, n_others",
                         [("model_stock", 1), ("nearswap", 2), ("arcee_fusion", 2)])
def test_wrong_model_count_refused(name, n_others):
    base, others = finetunes((4, 3), n_others, seed=0)
    with pytest.raises(ValueError, match="besides the base"):
        merge(name, base, others)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_not_mutated(name):
    base, others = finetunes((6, 5), 1 if name in ("nearswap", "arcee_fusion") else 3, seed=1)
    if name == "passthrough":
        x = base.clone()
        out = get_method(name).fn(TensorGroup("t", [x], {}, [{"scale": 1.0}]))
        assert torch.equal(x, base) and out.data_ptr() != x.data_ptr()
        return
    copies = [base.clone()] + [o.clone() for o in others]
    merge(name, copies[0], copies[1:])
    for before, after in zip([base, *others], copies):
        assert torch.equal(before, after)


# ------------------------------------------------------------------ model_stock


def test_model_stock_hand_computed_two_models():
    w0 = torch.tensor([3.0, -1.0])
    w1, w2 = w0 + torch.tensor([1.0, 0.0]), w0 + torch.tensor([1.0, 1.0])
    # d1 = (1, 0), d2 = (1, 1): cos = 1 / sqrt(2); k = 2
    # t = 2 cos / (1 + cos) = 2 / (sqrt(2) + 1) = 2 (sqrt(2) - 1)
    # w_H = w0 + t (avg - w0) = w0 + t (1, 1/2)
    t = 2 * (math.sqrt(2) - 1)
    expected = torch.tensor([3.0 + t, -1.0 + t / 2])
    assert torch.allclose(merge("model_stock", w0, [w1, w2]), expected, atol=1e-6)


def test_model_stock_hand_computed_three_models():
    w0 = torch.zeros(3)
    ws = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]),
          torch.tensor([1.0, 1.0, 0.0])]
    # pairwise cosines 0, 1/sqrt(2), 1/sqrt(2): mean c = sqrt(2) / 3; k = 3
    # t = 3c / (1 + 2c); avg = (2/3, 2/3, 0)
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    expected = torch.tensor([t * 2 / 3, t * 2 / 3, 0.0])
    assert torch.allclose(merge("model_stock", w0, ws), expected, atol=1e-6)


def test_model_stock_filter_wise_hand_computed():
    w0 = torch.zeros(2, 2)
    w1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w2 = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    # Row 0: cos = 1/sqrt(2), t = 2 (sqrt(2) - 1), avg row = (1, 1/2).
    # Row 1: cos = -1, so 1 + (k-1) cos = 0: no finite t, the base row is kept.
    t = 2 * (math.sqrt(2) - 1)
    expected = torch.tensor([[t, t / 2], [0.0, 0.0]])
    out = merge("model_stock", w0, [w1, w2], filter_wise=True)
    assert torch.allclose(out, expected, atol=1e-6)
    # Whole tensor: d1 = (1,0,1,0), d2 = (1,1,-1,0): dot 0, cos 0, t = 0, the base.
    assert torch.equal(merge("model_stock", w0, [w1, w2]), w0)


def test_model_stock_one_dimensional_filter_wise_is_whole_tensor():
    base, others = finetunes((17,), 3, seed=2)
    assert torch.allclose(merge("model_stock", base, others, filter_wise=True),
                          merge("model_stock", base, others), atol=1e-7)


def test_model_stock_properties():
    base, (w,) = finetunes((5, 4), 1, seed=3)
    # Identical fine-tunes: cos = 1, t = k / k = 1, the fine-tune itself.
    assert torch.allclose(merge("model_stock", base, [w, w, w]), w, atol=1e-6)
    # Nothing changed: every offset is 0, cos counts as 0, t = 0.
    assert torch.equal(merge("model_stock", base, [base, base]), base)


@pytest.mark.parametrize("shape", [(33,), (16, 24), (3, 4, 10)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_matches_mergekit(shape, filter_wise, k):
    base, others = finetunes(shape, k, seed=k)
    assert_parity(merge("model_stock", base, others, filter_wise=filter_wise),
                  reference("model_stock", base, others, filter_wise=filter_wise))


# -------------------------------------------------------------------------- sce


SCE_DELTAS = [torch.tensor([2.0, -1.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, -3.0, 0.5])]
SCE_BASE = torch.tensor([0.5, -0.25, 1.0, 0.0])


def test_sce_hand_computed():
    others = [SCE_BASE + d for d in SCE_DELTAS]
    # Calculate: mean squares 6.25/4 and 11.25/4, so eta = (5/14, 9/14).
    # Erase: sums (3, 0, -2, 1) elect signs (+, + (zero), -, +).
    #   entry 0: both kept: (5/14 * 2 + 9/14 * 1) / (5/14 + 9/14) = 19/14
    #   entry 1: model 1 (-1) erased: 1;  entry 2: model 1 (+1) erased: -3
    #   entry 3: both 0.5: 0.5
    expected = SCE_BASE + torch.tensor([19 / 14, 1.0, -3.0, 0.5])
    assert torch.allclose(merge("sce", SCE_BASE, others), expected, atol=1e-6)


def test_sce_select_topk_hand_computed():
    others = [SCE_BASE + d for d in SCE_DELTAS]
    # Variance across the two models, ((a - b) / 2)^2: (0.25, 1, 4, 0); three nonzero.
    # select_topk 0.7 keeps int(3 * 0.7) = 2 entries: 2 and 1. Masked deltas
    # (0, -1, 1, 0) and (0, 1, -3, 0); entry 1 sums to 0 (elects +): 1; entry 2: -3.
    expected = SCE_BASE + torch.tensor([0.0, 1.0, -3.0, 0.0])
    assert torch.allclose(merge("sce", SCE_BASE, others, select_topk=0.7), expected, atol=1e-6)
    # 0.5 keeps int(1.5) = 1 entry, the variance-4 one.
    expected = SCE_BASE + torch.tensor([0.0, 0.0, -3.0, 0.0])
    assert torch.allclose(merge("sce", SCE_BASE, others, select_topk=0.5), expected, atol=1e-6)


def test_sce_select_topk_ties_keep_later_entries():
    # Variances (1, 1, 1, 0): three nonzero, 0.5 keeps int(1.5) = 1 of the three tied
    # entries; our documented rule keeps the last one (entry 2).
    base = torch.zeros(4)
    others = [torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([-1.0, -1.0, -1.0, 0.0])]
    out = merge("sce", base, others, select_topk=0.5)
    # Entry 2: deltas (1, -1), sum 0 elects +, model 1 survives: 1.
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_sce_properties():
    base, (w,) = finetunes((6, 7), 1, seed=4)
    # One model: eta = 1 and its own signs win everywhere.
    assert torch.allclose(merge("sce", base, [w]), w, atol=1e-6)
    assert torch.allclose(merge("sce", base, [w, w]), w, atol=1e-6)
    assert torch.equal(merge("sce", base, [base, base]), base)
    assert torch.equal(merge("sce", base, []), base)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("shape", [(40,), (12, 20)])
def test_sce_matches_mergekit(select_topk, shape):
    base, others = finetunes(shape, 3, seed=5)
    assert_parity(merge("sce", base, others, select_topk=select_topk),
                  reference("sce", base, others, select_topk=select_topk))


# --------------------------------------------------------------------- nearswap


def test_nearswap_hand_computed():
    a = torch.tensor([1.0, 1.0, 1.0, 1.0])
    b = torch.tensor([1.5, 3.0, -3.0, 1.0])
    # |a - b| = (0.5, 2, 4, 0); t = 1: w = min(1, t / d) = (1, 0.5, 0.25, 1)
    # merged = a + w (b - a) = (1.5, 2, 0, 1)
    assert torch.allclose(merge("nearswap", a, [b], t=1.0), torch.tensor([1.5, 2.0, 0.0, 1.0]))


def test_nearswap_properties():
    a, (b,) = finetunes((5, 6), 1, seed=6)
    assert torch.equal(merge("nearswap", a, [b], t=0.0), a)
    assert torch.equal(merge("nearswap", a, [b], t=1e6), b)
    assert torch.equal(merge("nearswap", a, [a], t=0.3), a)


@pytest.mark.parametrize("t", [0.001, 0.01, 0.05])
def test_nearswap_matches_mergekit(t):
    base, others = finetunes((24, 32), 1, seed=7)
    assert_parity(merge("nearswap", base, others, t=t), reference("nearswap", base, others, t=t))


# ----------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_hand_computed():
    base = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 0.0, 1.0]])
    finetuned = base + torch.tensor([[0.1, 0.2, 0.25, 4.0], [3.0, 3.0, 3.0, 3.0]])
    # Row 1 shifts every entry by 3: the softmax is unchanged, KL = 0, importance ~0.
    # Row 0: KL = K > 0, importance K (0.1, 0.2, 0.25, 4).
    # Sorted (n = 8): (0, 0, 0, 0, .1K, .2K, .25K, 4K); positions floor(i 7 / 4) = 1, 3, 5
    # give Q1 = 0, Q2 = 0, Q3 = .2K; threshold = 0 + 1.5 (.2K - 0) = .3K.
    # Only the 4K entry reaches it.
    expected = base + torch.tensor([[0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(merge("arcee_fusion", base, [finetuned]), expected)


def test_arcee_fusion_threshold_is_tukey_fence_of_exact_quartiles():
    base, (f,) = finetunes((40, 50), 1, seed=8)
    from mergesmith.methods.arcee_fusion import importance_scores
    importance = importance_scores(f, base)
    s = importance.reshape(-1).sort().values
    n = s.numel()  # 2000: positions floor(1999 i / 4) = 499, 999, 1499
    fence = s[999] + 1.5 * (s[1499] - s[499])
    out = merge("arcee_fusion", base, [f])
    taken = importance >= fence
    assert 0 < taken.sum() < n
    assert torch.equal(out[taken], f[taken]) and torch.equal(out[~taken], base[~taken])


def test_arcee_fusion_properties():
    base, (f,) = finetunes((5, 6), 1, seed=9)
    assert torch.equal(merge("arcee_fusion", base, [base]), base)


@pytest.mark.parametrize("shape", [(64,), (24, 40), (3, 8, 16)])
def test_arcee_fusion_matches_mergekit(shape):
    base, others = finetunes(shape, 1, seed=10)
    ours = merge("arcee_fusion", base, others)
    assert 0 < (ours == others[0]).sum() < base.numel() / 2  # a real selection
    assert_parity(ours, reference("arcee_fusion", base, others))


def test_arcee_fusion_large_tensor_close_to_mergekit_sampling():
    # Above 1e6 entries mergekit estimates the quartiles from a random sample; ours are
    # exact, so the selections agree except near the threshold.
    base, (f,) = finetunes((1024, 1000), 1, seed=11)
    ours = merge("arcee_fusion", base, [f]) == f
    theirs = (reference("arcee_fusion", base, [f]) - f).abs() <= 1e-6 * f.abs()
    assert (ours != theirs).float().mean() < 1e-2


# -------------------------------------------------------------- ram, ramplus_tl


RAM_BASE = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.0, 0.0, -0.5])
RAM_DELTAS = [
    torch.tensor([1.0, 2.0, 0.0, 0.0, 1e-6, 0.0, 0.0]),
    torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 5.0, -1.0]),
    torch.tensor([0.0, 4.0, -2.0, 0.0, 0.0, 0.0, 0.0]),
]


def test_ram_hand_computed():
    others = [RAM_BASE + d for d in RAM_DELTAS]
    # Changed (|delta| > 1e-5): entry 0 by models 1, 2 -> (1 + 3) / 2 = 2
    # entry 1 by 1, 3 -> (2 + 4) / 2 = 3; entry 2 by 3 only -> -2; entry 3 none -> 0;
    # entry 4: 1e-6 is below epsilon -> 0; entries 5, 6 by model 2 only -> 5, -1.
    expected = RAM_BASE + torch.tensor([2.0, 3.0, -2.0, 0.0, 0.0, 5.0, -1.0])
    assert torch.allclose(merge("ram", RAM_BASE, others), expected, atol=1e-6)


def test_ram_epsilon_is_strict():
    # "changed" means |delta| > epsilon: a change of exactly epsilon is ignored.
    base = torch.zeros(2)
    out = merge("ram", base, [torch.tensor([0.5, 0.75])], epsilon=0.5)
    assert torch.equal(out, torch.tensor([0.0, 0.75]))


def test_ramplus_tl_hand_computed():
    others = [RAM_BASE + d for d in RAM_DELTAS]
    # Model 2: shared {0}, unique {5, 6}: rho = 1/2.  Model 3: shared {1}, unique {2}:
    # rho = 1.  Model 1 has no unique entries. Shared entries average as in RAM.
    # r = 0.5, alpha = 1: lambda_2 = 1 + 0.5 * 0.5 = 1.25, lambda_3 = 1 + 0.5 * 1 = 1.5
    expected = RAM_BASE + torch.tensor([2.0, 3.0, -3.0, 0.0, 0.0, 6.25, -1.25])
    out = merge("ramplus_tl", RAM_BASE, others, r=0.5, alpha=1.0)
    assert torch.allclose(out, expected, atol=1e-6)
    # alpha = 0.2 caps both rho: lambda = 1 + 0.5 * 0.2 = 1.1
    expected = RAM_BASE + torch.tensor([2.0, 3.0, -2.2, 0.0, 0.0, 5.5, -1.1])
    out = merge("ramplus_tl", RAM_BASE, others, r=0.5, alpha=0.2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_ramplus_tl_rho_is_shared_over_unique_for_large_epsilon():
    # Deliberate difference: rho_i = shared_i / unique_i. mergekit divides by
    # max(unique_i, epsilon), which only differs when epsilon > 1.
    base = torch.zeros(3)
    others = [torch.tensor([10.0, 10.0, 0.0]), torch.tensor([10.0, 0.0, 10.0])]
    # Each model: shared {0}, unique 1 entry: rho = 1, lambda = 1 + 1 * 1 = 2.
    ours = merge("ramplus_tl", base, others, epsilon=2.0, r=1.0, alpha=1.0)
    assert torch.equal(ours, torch.tensor([10.0, 20.0, 20.0]))
    theirs = reference("ramplus_tl", base, others, epsilon=2.0, r=1.0, alpha=1.0)
    assert torch.equal(theirs, torch.tensor([10.0, 15.0, 15.0]))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_properties(name):
    base, (w,) = sparse_finetunes((6, 8), 1, seed=12)
    # One model: every change is unique, and with no shared entries rho = 0, lambda = 1.
    assert torch.allclose(merge(name, base, [w]), w, atol=1e-6)
    assert torch.allclose(merge(name, base, [w, w, w]), w, atol=1e-6)
    assert torch.equal(merge(name, base, [base, base]), base)
    assert torch.equal(merge(name, base, []), base)


@pytest.mark.parametrize("shape", [(50,), (20, 30)])
@pytest.mark.parametrize("params", [{}, {"epsilon": 0.005}, {"r": 0.5, "alpha": 1.0}])
def test_ram_matches_mergekit(shape, params):
    base, others = sparse_finetunes(shape, 3, seed=13)
    if "r" not in params:
        assert_parity(merge("ram", base, others, **params),
                      reference("ram", base, others, **params))
    assert_parity(merge("ramplus_tl", base, others, **params),
                  reference("ramplus_tl", base, others, **params))


# ------------------------------------------------------------------ passthrough


def passthrough(tensor, scale):
    return get_method("passthrough").fn(TensorGroup("t", [tensor], {}, [{"scale": scale}]))


def test_passthrough_hand_computed():
    x = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(passthrough(x, 1.0), x)
    assert torch.equal(passthrough(x, 2.0), torch.tensor([2.0, -4.0, 1.0]))


def test_passthrough_refuses_two_inputs():
    with pytest.raises(ValueError, match="exactly one input"):
        get_method("passthrough").fn(TensorGroup("t", [torch.ones(2), torch.ones(2)], {},
                                                 [{"scale": 1.0}, {"scale": 1.0}]))


@pytest.mark.parametrize("scale", [1.0, 0.5, -3.0])
def test_passthrough_matches_mergekit(scale):
    x = torch.randn(7, 9, generator=torch.Generator().manual_seed(14))
    theirs = mergekit_methods.merge_tensors([x], "passthrough", parameters={"scale": [scale]})
    assert_parity(passthrough(x, scale), theirs)
    assert torch.equal(passthrough(x, 1.0), mergekit_methods.merge_tensors([x], "passthrough"))
