"""slerp, nuslerp, multislerp and karcher: hand-computed cases, properties,
parity with mergekit 0.1.5's own kernels, and parameter bounds."""

import math

import pytest
import torch

from mergesmith.methods import TensorGroup, get_method

R2 = math.sqrt(2.0) / 2.0  # sin(π/4) = cos(π/4)


def run(name, tensors, params, model_params, base_index=None):
    spec = get_method(name)
    return spec.fn(TensorGroup(name="t", tensors=tensors, params=params,
                               model_params=model_params, base_index=base_index))


def vec(*values):
    return torch.tensor(values, dtype=torch.float32)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(out, expected, atol=1e-6):
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=1e-5, atol=atol), (out, expected)


# --- slerp ---------------------------------------------------------------------------


def slerp(t, base, other):
    return run("slerp", [base, other], {"t": t}, [{}, {}], base_index=0)


def test_slerp_orthogonal_unit_vectors_midpoint():
    # θ = π/2, sin θ = 1: c0 = c1 = sin(π/4) = √2/2, so (a + b)/√2.
    close(slerp(0.5, vec(1, 0), vec(0, 1)), vec(R2, R2))


def test_slerp_keeps_norm_on_the_arc():
    # a = (2,0), b = (0,2), t = 1/3: θ = π/2, c0 = sin(π/3) = √3/2, c1 = sin(π/6) = 1/2
    # → (√3, 1), whose norm is 2 like both endpoints (a straight line would give 1.49).
    out = slerp(1 / 3, vec(2, 0), vec(0, 2))
    close(out, vec(math.sqrt(3), 1))
    assert abs(float(out.norm()) - 2.0) < 1e-6


def test_slerp_weights_apply_to_raw_tensors():
    # The angle uses directions, but the coefficients scale the raw tensors:
    # a = (3,0), b = (0,1), t = 1/2 → √2/2·(3, 1).
    close(slerp(0.5, vec(3, 0), vec(0, 1)), vec(3 * R2, R2))


def test_slerp_is_whole_tensor_not_per_row():
    # a = [[1,0],[0,1]], b = [[0,1],[0,1]]: <a,b> = 1, |a| = |b| = √2 → cos θ = 1/2,
    # θ = π/3; t = 1/2: c = sin(π/6)/sin(π/3) = 1/√3 → (a + b)/√3.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    s = 1 / math.sqrt(3)
    close(slerp(0.5, a, b), torch.tensor([[s, s], [0.0, 2 * s]]))


def test_slerp_small_norms():
    # a = 0.01·(1,0), b = 0.01·(1,1): cos θ = 1/√2, θ = π/4; t = 1/2:
    # c = sin(π/8)/sin(π/4) = 0.541196 → 0.01·c·(2, 1). Only norms <= 1e-8 count as zero.
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(slerp(0.5, vec(0.01, 0), vec(0.01, 0.01)), vec(0.02 * c, 0.01 * c), atol=1e-8)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_slerp_scale_equivariant(scale):
    a, b = randn(5, 6, seed=34), randn(5, 6, seed=35)
    out = slerp(0.3, a * scale, b * scale)
    assert torch.allclose(out, slerp(0.3, a, b) * scale, rtol=1e-5, atol=1e-6 * scale)


def test_slerp_colinear_falls_back_to_linear():
    # b = 2a: cos θ = 1 > 0.9995 → 0.75·a + 0.25·b = (1.25, 2.5).
    close(slerp(0.25, vec(1, 2), vec(2, 4)), vec(1.25, 2.5))
    # Antipodal: |cos θ| = 1 → (1 - t)·a + t·(-a) = (1 - 2t)·a = 0.4·a at t = 0.3.
    a = randn(5, seed=1)
    close(slerp(0.3, a, -a), 0.4 * a)


def test_slerp_threshold_side():
    # cos θ = 0.999 (< 0.9995): spherical, so two unit vectors stay on the unit
    # circle: |slerp| = 1. cos θ = 0.9999 (> 0.9995): linear, |lerp| at t = 1/2 is
    # cos(θ/2) = √((1 + 0.9999)/2) = 0.999975.
    for cos, expected_norm in ((0.999, 1.0), (0.9999, math.sqrt((1 + 0.9999) / 2))):
        b = vec(cos, math.sqrt(1 - cos * cos))
        out = slerp(0.5, vec(1, 0), b)
        assert abs(float(out.norm()) - expected_norm) < 2e-6, (cos, float(out.norm()))


def test_slerp_zero_tensor_is_orthogonal_to_everything():
    # mergekit replaces a zero norm by 1, so cos θ = 0, θ = π/2 and
    # slerp = sin((1-t)π/2)·0 + sin(tπ/2)·b; at t = 1/2 that is √2/2·b.
    close(slerp(0.5, vec(0, 0), vec(1, 1)), vec(R2, R2))


def test_slerp_extrapolates_like_mergekit():
    # t is not bounded (mergekit accepts any t). a ⟂ b unit, t = 2: θ = π/2,
    # c0 = sin(-π/2) = -1, c1 = sin(π) = 0 → -a.
    assert get_method("slerp").param("t").check(2.0) is None
    close(slerp(2.0, vec(1, 0), vec(0, 1)), vec(-1, 0))


def test_slerp_endpoints_are_exact():
    a, b = randn(6, 7, seed=2), randn(6, 7, seed=3)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.8])
def test_slerp_swap_symmetry(t):
    a, b = randn(4, 9, seed=4), randn(4, 9, seed=5)
    swapped = run("slerp", [a, b], {"t": 1 - t}, [{}, {}], base_index=1)
    close(slerp(t, a, b), swapped, atol=1e-6)


def test_slerp_identical_inputs():
    a = randn(3, 8, seed=6)
    close(slerp(0.37, a, a.clone()), a)


# --- nuslerp -------------------------------------------------------------------------


def nuslerp(tensors, weights, base_index=None, flatten=True, row_wise=False):
    model_params = [{"weight": w} for w in weights]
    if base_index is not None:
        model_params.insert(base_index, {})
    return run("nuslerp", tensors,
               {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
               model_params, base_index=base_index)


def test_nuslerp_t_is_second_weight_share():
    # weights 1, 3 → t = 3/4; θ = π/2 → (sin(π/8), sin(3π/8)).
    close(nuslerp([vec(1, 0), vec(0, 1)], [1.0, 3.0]),
          vec(math.sin(math.pi / 8), math.sin(3 * math.pi / 8)))


def test_nuslerp_zero_weight_sum_is_midpoint():
    # |w0 + w1| < 1e-6 → t = 1/2 (mergekit), so √2/2·(1, 1) for these unit vectors.
    for weights in ([0.0, 0.0], [1.0, -1.0]):
        close(nuslerp([vec(1, 0), vec(0, 1)], weights), vec(R2, R2))


def test_nuslerp_with_base_interpolates_task_vectors():
    # task vectors (1,0) and (0,1), equal weights → base + √2/2·(1, 1).
    base = vec(1, 1)
    out = nuslerp([base, base + vec(1, 0), base + vec(0, 1)], [2.0, 2.0], base_index=0)
    close(out, vec(1 + R2, 1 + R2))


def test_nuslerp_colinear_is_linear():
    # a = (1,0), b = (3,0): cos θ = 1 → 1 - cos²θ = 0 <= 1e-16 → lerp at t = 1/4:
    # 0.75·1 + 0.25·3 = 1.5.
    close(nuslerp([vec(1, 0), vec(3, 0)], [3.0, 1.0]), vec(1.5, 0))


A2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
B2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


def test_nuslerp_flatten_rows_and_columns():
    # flatten: <A,B> = 1, |A| = |B| = √2 → θ = π/3, c = sin(π/6)/sin(π/3) = 1/√3.
    s = 1 / math.sqrt(3)
    close(nuslerp([A2, B2], [1.0, 1.0]), torch.tensor([[s, s], [2 * s, 0.0]]))
    # rows (last dim): row 0 is (1,0)→(0,1), θ = π/2 → √2/2·(1,1); row 1 is
    # colinear → (1, 0).
    close(nuslerp([A2, B2], [1.0, 1.0], flatten=False),
          torch.tensor([[R2, R2], [1.0, 0.0]]))
    # nuslerp_row_wise (slices along dim 0, i.e. columns): column 0 is (1,1)→(0,1):
    # cos θ = 1/√2, θ = π/4, c = sin(π/8)/sin(π/4) → c·(1, 2); column 1 is
    # (0,0)→(1,0): a zero slice has cos θ = 0, θ = π/2 → sin(π/4)·(1,0).
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(nuslerp([A2, B2], [1.0, 1.0], flatten=False, row_wise=True),
          torch.tensor([[c, R2], [2 * c, 0.0]]))


def test_nuslerp_row_wise_ignored_when_flattened():
    a, b = randn(4, 5, seed=7), randn(4, 5, seed=8)
    assert torch.equal(nuslerp([a, b], [1.0, 2.0], row_wise=True),
                       nuslerp([a, b], [1.0, 2.0], row_wise=False))


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_exact_antipodes_are_linear(flatten, row_wise):
    # Task vectors a and -a (exact, dyadic values): cos θ = -1 for the whole tensor
    # and for every slice → colinear → base + (1 - t)·a + t·(-a) = base + (1 - 2t)·a,
    # t = 3/4 → base - a/2. (Deliberate difference: mergekit's float32 sums miss
    # -1 for some slices and follow the spherical branch there, whose limit at
    # θ → π is cos(tπ)·a instead.)
    a = torch.round(randn(16, 24, seed=32) * 1024) / 1024
    base = torch.round(randn(16, 24, seed=33) * 4 * 1024) / 1024
    out = nuslerp([base, base + a, base - a], [1.0, 3.0], base_index=0,
                  flatten=flatten, row_wise=row_wise)
    close(out, base - a / 2)


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_endpoints_and_swap(flatten):
    a, b = randn(5, 6, seed=9), randn(5, 6, seed=10)
    close(nuslerp([a, b], [1.0, 0.0], flatten=flatten), a)
    close(nuslerp([a, b], [0.0, 1.0], flatten=flatten), b)
    close(nuslerp([a, b], [1.0, 2.5], flatten=flatten),
          nuslerp([b, a], [2.5, 1.0], flatten=flatten))
    close(nuslerp([a, a.clone()], [1.0, 2.5], flatten=flatten), a)


# --- multislerp ----------------------------------------------------------------------


def multislerp(tensors, weights, base_index=None, normalize=True, eps=1e-8):
    model_params = [{"weight": w} for w in weights]
    if base_index is not None:
        model_params.insert(base_index, {})
    return run("multislerp", tensors, {"normalize_weights": normalize, "eps": eps},
               model_params, base_index=base_index)


def test_multislerp_two_orthogonal_unit_vectors():
    # m = normalise(½(1,0) + ½(0,1)) = √2/2·(1,1); mean norm 1.
    close(multislerp([vec(1, 0), vec(0, 1)], [1.0, 1.0]), vec(R2, R2))


def test_multislerp_unequal_weights_and_norms():
    # a = (2,0), b = (0,1), w = (1,3) → (¼, ¾). Directions (1,0), (0,1):
    # Σ w u = (0.25, 0.75), |·| = √0.625 → m = (0.316228, 0.948683);
    # mean norm ¼·2 + ¾·1 = 1.25 → (0.395285, 1.185854).
    m = vec(0.25, 0.75) / math.sqrt(0.625)
    close(multislerp([vec(2, 0), vec(0, 1)], [1.0, 3.0]), 1.25 * m)
    # normalize_weights: false keeps w = (1,3): same direction, norm 1·2 + 3·1 = 5.
    close(multislerp([vec(2, 0), vec(0, 1)], [1.0, 3.0], normalize=False), 5 * m)


def test_multislerp_with_base_and_three_models():
    # task vectors e1, e2, e3 (unit), equal weights: m = (1,1,1)/√3, mean norm 1.
    base = vec(1, -1, 2)
    models = [base + torch.eye(3)[i] for i in range(3)]
    out = multislerp([base, *models], [1.0, 1.0, 1.0], base_index=0)
    close(out, base + vec(1, 1, 1) / math.sqrt(3))


def test_multislerp_eps_scales_by_cos_eps():
    # mergekit maps the (zero) tangent average back with norm 0 + eps, so the
    # result carries cos(eps). a = (1,0), b = (0,1), eps = ¼: u = x/1.25, so
    # |½u_a + ½u_b| = 0.8·√2/2 = 0.566 > eps and m = √2/2·(1,1) → cos(¼)·√2/2·(1,1).
    close(multislerp([vec(1, 0), vec(0, 1)], [1.0, 1.0], eps=0.25),
          math.cos(0.25) * vec(R2, R2))
    # eps = ½ exceeds that 0.566·(1.25/1.5) = 0.471, so the directions count as
    # cancelling and two models fall back to ½a + ½b.
    close(multislerp([vec(1, 0), vec(0, 1)], [1.0, 1.0], eps=0.5), vec(0.5, 0.5))


def test_multislerp_antipodal_pair_falls_back_to_linear():
    # (1,0) and (-1,0), equal weights: the directions cancel; with two models the
    # result is ½a + ½b = 0 (plus the base).
    base = vec(5, 5)
    out = multislerp([base, base + vec(1, 0), base - vec(1, 0)], [1.0, 1.0], base_index=0)
    close(out, base)


def test_multislerp_cancelling_three_models_refused():
    with pytest.raises(ValueError, match="weight"):
        multislerp([vec(1, 0), vec(-1, 0), vec(2, 0)], [1.0, 2.0, 1.0])


def test_multislerp_all_task_vectors_zero_gives_base():
    # Deliberate difference: mergekit raises here for three or more models.
    base = randn(3, 4, seed=11)
    out = multislerp([base, base.clone(), base.clone(), base.clone()],
                     [1.0, 2.0, 3.0], base_index=0)
    close(out, base)


def test_multislerp_one_model_and_identical_models():
    a, base = randn(3, 4, seed=12), randn(3, 4, seed=13)
    close(multislerp([base, a], [0.3], base_index=0), a)
    close(multislerp([a, a.clone(), a.clone()], [1.0, 2.0, 0.5]), a)


def test_multislerp_permutation_invariant():
    a, b, c = (randn(4, 4, seed=s) for s in (14, 15, 16))
    close(multislerp([a, b, c], [1.0, 2.0, 3.0]), multislerp([c, a, b], [3.0, 1.0, 2.0]))


def test_multislerp_zero_weight_sum_refused():
    spec = get_method("multislerp")
    params = {"normalize_weights": True, "eps": 1e-8}
    assert spec.check_params(params, [{}, {"weight": 1.0}, {"weight": -1.0}])
    assert not spec.check_params({**params, "normalize_weights": False},
                                 [{"weight": 1.0}, {"weight": -1.0}])
    assert not spec.check_params(params, [{"weight": 1.0}, {"weight": 1.0}])
    with pytest.raises(ValueError, match="normalize_weights"):
        multislerp([vec(1, 0), vec(0, 1)], [1.0, -1.0])


# --- karcher -------------------------------------------------------------------------


def karcher(tensors, max_iter=10, tol=1e-5, base_index=None):
    return run("karcher", tensors, {"max_iter": max_iter, "tol": tol},
               [{} for _ in tensors], base_index=base_index)


def test_karcher_two_unit_vectors_is_bisector():
    close(karcher([vec(1, 0), vec(0, 1)]), vec(R2, R2))


def test_karcher_differs_from_euclidean_mean():
    # Unit vectors at angles 0, 0, π/2. Euclidean start: (2,1)/√5, angle atan(½)
    # = 26.565°. On a circle one Riemannian step lands on the mean angle
    # (0 + 0 + 90)/3 = 30°, so the Karcher mean is (cos 30°, sin 30°) = (√3/2, ½).
    inputs = [vec(1, 0), vec(1, 0), vec(0, 1)]
    close(karcher(inputs), vec(math.sqrt(3) / 2, 0.5))
    # max_iter = 0 stops at the normalised Euclidean mean.
    close(karcher(inputs, max_iter=0), vec(2, 1) / math.sqrt(5))


def test_karcher_scale_is_mean_norm():
    # directions (1,0), (0,1) → bisector; scale (2 + 4)/2 = 3.
    close(karcher([vec(2, 0), vec(0, 4)]), 3 * vec(R2, R2))


def test_karcher_zero_tensor_lowers_scale_only():
    # The zero tensor has no direction, but its norm 0 still counts in the scale:
    # bisector · (0 + 1 + 1)/3.
    close(karcher([vec(0, 0), vec(1, 0), vec(0, 1)]), (2 / 3) * vec(R2, R2))
    # Norms at or below tol count as zero for the direction too.
    close(karcher([vec(1e-6, 0), vec(0, 1)]), vec(0, (1 + 1e-6) / 2), atol=1e-7)
    assert torch.equal(karcher([vec(0, 0), vec(0, 0)]), vec(0, 0))


def test_karcher_exact_antipodes_keep_first_direction():
    # u and -u: the Euclidean start is 0, so mergekit starts from the first
    # direction; the antipode's tangent u' - (-1)·u is exactly 0, so it stays:
    # result = |a|·a/|a| = a.
    a = randn(4, 5, seed=17)
    close(karcher([a, -a]), a)


def test_karcher_base_is_just_an_input():
    a, b, c = (randn(3, 3, seed=s) for s in (18, 19, 20))
    assert torch.equal(karcher([a, b, c], base_index=1), karcher([a, b, c]))


def test_karcher_properties():
    a, b, c = (randn(5, 3, seed=s) for s in (21, 22, 23))
    close(karcher([a]), a)
    close(karcher([a, a.clone(), a.clone()]), a)
    close(karcher([a, b, c]), karcher([c, a, b]))


# --- shared pieces -------------------------------------------------------------------


@pytest.mark.parametrize("size", [5, 64, 3 * 4096 + 17])
def test_dot_blocks_and_tail(size):
    from mergesmith.methods.spherical import dot
    x, y = randn(size, seed=36), randn(size, seed=37)
    expected = float(torch.dot(x.double(), y.double()))
    assert abs(dot(x, y) - expected) <= 1e-6 * float(x.double().norm() * y.double().norm())
    # Exact sign symmetry, which makes exact antipodes give cos θ = -1 exactly.
    assert dot(x, -x) == -dot(x, x)


def test_dot_is_accurate_on_long_vectors():
    # 2^22 bf16-valued entries of one sign: torch.dot drifts by ~1e-4 here; the
    # blocked sum must stay within 1e-6 of the float64 value.
    from mergesmith.methods.spherical import dot
    x = (randn(1 << 22, seed=38).abs() + 0.5).bfloat16().float()
    expected = float(torch.dot(x.double(), x.double()))
    assert abs(dot(x, x) / expected - 1) < 1e-6


# --- shared properties ---------------------------------------------------------------


def test_inputs_are_not_mutated():
    base, a, b, c = (randn(4, 6, seed=s) for s in (24, 25, 26, 27))
    copies = [x.clone() for x in (base, a, b, c)]
    slerp(0.4, base, a)
    nuslerp([base, a, b], [1.0, 2.0], base_index=0)
    nuslerp([a, b], [1.0, 2.0], flatten=False)
    multislerp([base, a, b, c], [1.0, 2.0, 3.0], base_index=0)
    multislerp([a], [1.0])[0] += 1
    karcher([a, b, c])
    karcher([a])[0] += 1
    for x, y in zip((base, a, b, c), copies):
        assert torch.equal(x, y)


def test_specs():
    sl, nu, multi, kar = (get_method(n) for n in ("slerp", "nuslerp", "multislerp", "karcher"))
    assert (sl.base.value, sl.min_models, sl.max_models) == ("required", 1, 1)
    assert sl.param("t").required
    assert (nu.base.value, nu.min_models, nu.max_models) == ("optional", 2, 2)
    assert nu.param("weight").per_model and not nu.param("weight").on_base
    assert nu.param("nuslerp_flatten").default is True
    assert nu.param("nuslerp_row_wise").default is False
    assert (multi.base.value, multi.min_models, multi.max_models) == ("optional", 1, None)
    assert multi.param("normalize_weights").default is True
    assert multi.param("eps").default == 1e-8
    assert kar.base.value == "ignored"
    assert (kar.param("max_iter").default, kar.param("tol").default) == (10, 1e-5)


@pytest.mark.parametrize("method,name,bad,good", [
    ("karcher", "max_iter", -1, 0),
    ("karcher", "tol", -1e-6, 0.0),
    ("multislerp", "eps", 0.0, 1e-12),
    ("multislerp", "eps", 1.0, 0.5),
])
def test_bounds(method, name, bad, good):
    param = get_method(method).param(name)
    assert param.check(param.coerce(bad)) is not None
    assert param.check(param.coerce(good)) is None


def test_karcher_max_iter_must_be_whole():
    with pytest.raises(ValueError):
        get_method("karcher").param("max_iter").coerce(2.5)


# --- parity with mergekit 0.1.5 ------------------------------------------------------

mk_base = pytest.importorskip("mergekit.merge_methods.base")


def mergekit_merge(method, tensors, parameters, base_index=None):
    group = mk_base.TensorGroup.from_tensors(tensors, base_index=base_index)
    return method([group], parameters=parameters)[0]


def relative_difference(ours, theirs):
    # Scale-aware: max |Δ| over the largest reference entry, so entries near zero
    # do not turn rounding into huge elementwise ratios.
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


# (64, 201) has 12864 entries: spherical.dot's 64-long blocks, and entries that
# with dyadic() have few mantissa bits, like bf16 weights.
SHAPES = [(16, 24), (40,), (2, 3, 4), (64, 201)]


def at_cosine(a, b, cos):
    """A unit tensor whose cosine with ``a`` is ``cos`` (in the plane of a and b)."""
    u = a / a.norm()
    perpendicular = b - (b * u).sum() * u
    return cos * u + math.sqrt(1 - cos * cos) * perpendicular / perpendicular.norm()


def dyadic(x):
    """x rounded to multiples of 2^-10, so that adding and then subtracting a
    dyadic base (below) is exact and task vectors keep their exact relations."""
    return torch.round(x * 1024) / 1024


def dyadic_base(shape):
    return dyadic(randn(*shape, seed=7) * 4)


def pair_cases(shape, seed):
    a, b = dyadic(randn(*shape, seed=seed)), dyadic(randn(*shape, seed=seed + 1))
    # "near": cos θ ≈ 0.999, on the spherical side of slerp's 0.9995 threshold.
    return {"random": (a, b), "colinear": (a, 2 * a), "antipodal": (a, -a),
            "zero": (torch.zeros_like(a), b),
            "near": (dyadic(a / a.norm() * 8), dyadic(at_cosine(a, b, 0.999) * 8))}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ["random", "colinear", "antipodal", "zero", "near"])
def test_parity_slerp(shape, case):
    from mergekit.merge_methods.slerp import slerp_merge_method
    a, b = pair_cases(shape, 100)[case]
    for t in (0.0, 0.3, 0.75, 1.0):
        ours = slerp(t, a, b)
        theirs = mergekit_merge(slerp_merge_method, [a, b], {"t": t}, base_index=0)
        assert relative_difference(ours, theirs) < 1e-5, (case, t)


# Exact antipodes are left out of nuslerp parity on purpose: mergekit's colinear
# test (1 - cos²θ <= 1e-16) needs its float32 sum to land on exactly -1, which it
# misses for some rows; see test_nuslerp_exact_antipodes_are_linear.
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ["random", "colinear", "zero", "near"])
def test_parity_nuslerp(shape, case):
    from mergekit.merge_methods.nuslerp import nuslerp_merge_method
    a, b = pair_cases(shape, 200)[case]
    base = dyadic_base(shape)
    for flatten in (True, False):
        for row_wise in (True, False):
            for weights in ([1.0, 3.0], [0.5, -0.2], [1.0, -1.0]):
                params = {"weight": weights, "nuslerp_flatten": flatten,
                          "nuslerp_row_wise": row_wise}
                ours = nuslerp([a, b], weights, flatten=flatten, row_wise=row_wise)
                theirs = mergekit_merge(nuslerp_merge_method, [a, b], params)
                assert relative_difference(ours, theirs) < 1e-5
                ours = nuslerp([base, base + a, base + b], weights, base_index=0,
                               flatten=flatten, row_wise=row_wise)
                theirs = mergekit_merge(nuslerp_merge_method, [base, base + a, base + b],
                                        params, base_index=0)
                assert relative_difference(ours, theirs) < 1e-5


def test_parity_nuslerp_zero_rows():
    from mergekit.merge_methods.nuslerp import nuslerp_merge_method
    a, b = randn(6, 5, seed=30), randn(6, 5, seed=31)
    a[2] = 0.0
    a[:, 3] = 0.0
    b[4] = a[4] * 3.0
    for row_wise in (True, False):
        params = {"weight": [1.0, 2.0], "nuslerp_flatten": False, "nuslerp_row_wise": row_wise}
        ours = nuslerp([a, b], [1.0, 2.0], flatten=False, row_wise=row_wise)
        theirs = mergekit_merge(nuslerp_merge_method, [a, b], params)
        assert relative_difference(ours, theirs) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_multislerp(shape):
    from mergekit.merge_methods.multislerp import multislerp as mk_multislerp
    base = randn(*shape, seed=40)
    models = [randn(*shape, seed=41 + i) for i in range(4)]
    for count in (1, 2, 4):
        for weights in ([1.0, 3.0, 0.5, 2.0][:count], [0.2, -0.7, 1.5, 1.0][:count]):
            for normalize in (True, False):
                for eps in (1e-8, 0.3):
                    params = {"weight": weights, "normalize_weights": normalize, "eps": eps}
                    ours = multislerp(models[:count], weights, normalize=normalize, eps=eps)
                    theirs = mergekit_merge(mk_multislerp, models[:count], params)
                    assert relative_difference(ours, theirs) < 1e-5
                    ours = multislerp([base, *models[:count]], weights, base_index=0,
                                      normalize=normalize, eps=eps)
                    theirs = mergekit_merge(mk_multislerp, [base, *models[:count]], params,
                                            base_index=0)
                    assert relative_difference(ours, theirs) < 1e-5


def test_parity_multislerp_degenerate():
    from mergekit.merge_methods.multislerp import multislerp as mk_multislerp
    base, a = dyadic_base((5, 4)), dyadic(randn(5, 4, seed=51))
    # Where they differ on purpose: an exact antipodal pair (a, -a). Our directions cancel
    # to exactly 0 and take the linear fallback, 0 here; mergekit sums them with a matrix
    # product whose fused multiply-adds leave rounding noise on some CPUs, which its
    # exponential map then scales up into an arbitrary result (seen on an AVX-512 machine).
    assert torch.equal(multislerp([base, base + a, base - a], [1.0, 1.0], base_index=0), base)
    cases = [
        ([base, base.clone(), base + a], [1.0, 2.0]),        # one zero task vector
        ([base, base.clone(), base.clone()], [1.0, 2.0]),    # two zero task vectors
        ([base, base + a, base + 2 * a], [1.0, 2.0]),        # colinear
    ]
    for tensors, weights in cases:
        ours = multislerp(tensors, weights, base_index=0)
        theirs = mergekit_merge(mk_multislerp, tensors, {"weight": weights}, base_index=0)
        assert relative_difference(ours, theirs) < 1e-5
    # Where they differ on purpose: three zero task vectors.
    with pytest.raises(ValueError):
        mergekit_merge(mk_multislerp, [base] * 4, {"weight": [1.0, 1.0, 1.0]}, base_index=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_karcher(shape):
    from mergekit.merge_methods.karcher import karcher_merge_method
    xs = [randn(*shape, seed=60 + i) * (i + 1) for i in range(4)]
    for count in (1, 2, 4):
        for max_iter in (0, 1, 10):
            for tol in (1e-5, 1e-2):
                ours = karcher(xs[:count], max_iter=max_iter, tol=tol)
                theirs = mergekit_merge(karcher_merge_method, xs[:count],
                                        {"max_iter": max_iter, "tol": tol})
                assert relative_difference(ours, theirs) < 1e-5


def test_parity_karcher_degenerate():
    from mergekit.merge_methods.karcher import karcher_merge_method
    a, b = randn(6, 4, seed=70), randn(6, 4, seed=71)
    tiny = torch.full_like(a, 1e-8)
    for xs in ([a, -a], [a, -a, b], [a, -2 * a], [a, a.clone()], [a, 2 * a, b],
               [torch.zeros_like(a), a, b], [tiny, a, b]):
        ours = karcher(xs)
        theirs = mergekit_merge(karcher_merge_method, xs, {})
        assert relative_difference(ours, theirs) < 1e-5
