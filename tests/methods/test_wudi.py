"""WUDI-Merging: cases worked by hand from the paper's loss, properties, and parity with
FusionBench 0.2.33's ``wudi_merging`` on single tensors and a whole tiny checkpoint.

Tolerance. FusionBench differentiates the loss with autograd; we form the same gradient
in closed form, so the two gradients differ by float32 rounding. Adam divides the first
moment by the root of the second, so a rounding difference in a gradient entry changes
that entry's step by a similar relative amount, except where the gradient is near zero,
where the ratio can swing by up to the whole step (lr). Over ``iterations`` steps the
trajectories can therefore differ by at most about lr * iterations per entry (3e-3 at
the defaults), far above rounding; in practice they stay within ~1e-7 of the tensor's
scale (measured on these cases: at most 1.6e-7 after 300 steps). We assert a maximum
difference of 1e-5 of the largest entry, the bound used for every other parity test.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from fusion_bench.method.wudi.wudi import wudi_merging

import mergesmith
from mergesmith.methods import TensorGroup, get_method
from mergesmith.methods.wudi import interference_gradient, wudi_task_vector
from tiny_models import load_state

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def merge(base, models, weights=None, vocab=False, **params):
    weights = weights or [1.0] * len(models)
    return get_method("wudi").fn(TensorGroup(
        name="t", tensors=[base, *models],
        params={"iterations": 20, "learning_rate": 1e-5, "include_embeddings": False, **params},
        model_params=[{}] + [{"weight": w} for w in weights], base_index=0, vocab=vocab))


def task_vectors(shape, k, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    common = scale * torch.randn(shape, generator=g)
    return [common + scale * torch.randn(shape, generator=g) for _ in range(k)]


def fusion_bench(deltas, iterations, exclude=()):
    """FusionBench's merged task vector(s) for one tensor or a dict of them, on CPU."""
    single = not isinstance(deltas[0], dict)
    tvs = [{"w": d} for d in deltas] if single else deltas
    out = wudi_merging(tvs, accelerator="cpu", iter_num=iterations, exclude_keys=list(exclude))
    out = {k: v.detach() for k, v in out.items()}
    return out["w"] if single else out


def rel_diff(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- hand-computed cases

def test_orthogonal_tasks_are_summed_and_stay():
    # tau_1 = [1, 0], tau_2 = [0, 1]: from tau = [1, 1], (tau - tau_1) tau_1^T = [0, 1].[1, 0] = 0
    # and likewise for task 2, so L = 0, the gradient is 0 and Adam never moves.
    out = merge(torch.zeros(1, 2), [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], iterations=50)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0]]))


def test_one_adam_step_from_two_identical_tasks():
    # tau_1 = tau_2 = t = [1, -2] (1 x 2, ||t||^2 = 5). Start tau = 2t. Each term's
    # gradient is 2 (tau - t) t^T t / 5 = 2 t (t t^T) / 5 = 2t, so g = 4t = [4, -8].
    # Adam's first step: m = 0.1 g, v = 0.001 g^2, m / (1 - 0.9) = g, sqrt(v / (1 - 0.999)) = |g|,
    # step = lr g / (|g| + 1e-8): tau = [2 - lr * 4 / (4 + 1e-8), -4 + lr * 8 / (8 + 1e-8)].
    lr = 1e-3
    t = torch.tensor([[1.0, -2.0]])
    out = merge(torch.zeros(1, 2), [t, t.clone()], iterations=1, learning_rate=lr)
    expected = torch.tensor([[2 - lr * 4 / (4 + 1e-8), -4 + lr * 8 / (8 + 1e-8)]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_identical_tasks_converge_to_that_task_vector():
    # L = 3 ||(tau - t) t^T||^2 / ||t||^2 is 0 only at tau = t when t has full column rank:
    # the merge of copies is the copy. With t = diag(1, 2, 3, 4) the loss separates by entry
    # and Adam walks each from 3t down to t (to within about one step, lr).
    t = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = merge(torch.zeros(4, 4), [t, t.clone(), t.clone()], iterations=400, learning_rate=0.05)
    assert (out - t).abs().max() < 0.1


# ---------------------------------------------------------------- parity with FusionBench

@pytest.mark.parametrize("shape,k,iterations", [((16, 8), 3, 30), ((8, 16), 2, 30), ((12, 12), 4, 30),
                                                ((24, 6), 3, 300), ((4, 32), 2, 30), ((6, 40), 3, 300)])
def test_matches_fusion_bench_on_single_tensors(shape, k, iterations):
    # (4, 32) and (6, 40) have cols >= 2 T rows and take the term-by-term gradient, the others
    # the Gram-matrix one (the wide (8, 16) too: cols < 2 T rows).
    deltas = task_vectors(shape, k, seed=shape[0] + k)
    ours = wudi_task_vector([d.clone() for d in deltas], iterations)
    assert rel_diff(ours, fusion_bench(deltas, iterations)) < 1e-5


@pytest.mark.parametrize("shape,k", [((8, 16), 2), ((4, 32), 2), ((16, 8), 3), ((8, 12), 1), ((12, 8), 1)])
def test_both_gradient_forms_are_the_gradient(shape, k):
    # Whichever form interference_gradient picks, it is dL/dtau: checked against autograd on
    # the loss itself, in float64, at a point away from the start.
    deltas = [d.double() for d in task_vectors(shape, k, seed=7)]
    sq = [float(d.square().sum()) for d in deltas]
    tau = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    picked = interference_gradient(deltas, sq)
    assert (picked.__name__ == "term_by_term") == (shape[1] >= 2 * k * shape[0] or k == 1 < shape[1] / shape[0])
    tau_var = tau.clone().requires_grad_()
    loss = sum(((tau_var - d) @ d.T).square().sum() / s for d, s in zip(deltas, sq))
    loss.backward()
    torch.testing.assert_close(picked(tau), tau_var.grad, rtol=1e-12, atol=1e-14)


def test_the_task_vectors_are_released_once_the_loss_has_them():
    deltas = task_vectors((8, 16), 2, seed=1)
    wudi_task_vector(deltas, 3)
    assert deltas == []


def test_matches_fusion_bench_on_a_whole_checkpoint(tmp_path, model_family):
    base, fts = model_family("llama", 3)
    recipe = {"merge_method": "wudi", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p)} for p in fts], "parameters": {"iterations": 25}}
    dry = mergesmith.merge(recipe, tmp_path / "dry", dry_run=True)
    assert dry.out_dir is None and not (tmp_path / "dry").exists()
    assert all(t.params["iterations"] == 25 for t in dry.plan.tensors)
    mergesmith.merge(recipe, tmp_path / "out")
    ours = load_state(tmp_path / "out")
    b = load_state(base)
    tvs = [{k: v - b[k] for k, v in load_state(p).items()} for p in fts]
    merged = fusion_bench(tvs, 25, exclude=EMBEDDINGS)
    assert sorted(ours) == sorted(b)
    for name, ref_base in b.items():
        assert rel_diff(ours[name], ref_base + merged[name]) < 1e-5, name


def test_defaults_are_the_authors():
    spec = get_method("wudi")
    # The authors' ViT script (args.py --iter) and FusionBench's function both default to
    # 300 steps; both hard-code Adam's learning rate 1e-5.
    assert spec.param("iterations").default == 300
    assert inspect.signature(wudi_merging).parameters["iter_num"].default == 300
    lr = float(re.search(r"Adam\([^)]*lr=([0-9.e-]+)", inspect.getsource(wudi_merging)).group(1))
    assert spec.param("learning_rate").default == lr == 1e-5
    assert spec.param("include_embeddings").default is False


# ---------------------------------------------------------------- properties

def test_one_model_gives_its_task_vector_back():
    # From tau = tau_1 the gradient 2 (tau - tau_1) tau_1^T tau_1 / ||tau_1||^2 is exactly 0.
    g = torch.Generator().manual_seed(0)
    base, model = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert torch.equal(merge(base, [model], iterations=30) - base, (model - base))


def test_deterministic():
    deltas = task_vectors((10, 6), 3, seed=2)
    runs = [wudi_task_vector([d.clone() for d in deltas], 40) for _ in range(2)]
    assert torch.equal(*runs)


def test_weight_scales_the_task_vector_first():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(9, 5, generator=g)
    models = [base + d for d in task_vectors((9, 5), 3, seed=5)]
    weights = [0.5, 2.0, 1.0]
    scaled = [base + w * (m - base) for m, w in zip(models, weights)]
    assert rel_diff(merge(base, models, weights=weights), merge(base, scaled)) < 1e-6


def test_vectors_and_embeddings_get_the_mean_task_vector():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(8, generator=g)
    deltas = task_vectors((8,), 3, seed=7)
    torch.testing.assert_close(merge(base, [base + d for d in deltas]), base + sum(deltas) / 3)
    base = torch.randn(8, 4, generator=g)
    deltas = task_vectors((8, 4), 3, seed=8)
    models = [base + d for d in deltas]
    torch.testing.assert_close(merge(base, models, vocab=True), base + sum(deltas) / 3)
    optimized = merge(base, models, vocab=True, include_embeddings=True)
    torch.testing.assert_close(optimized, merge(base, models))
    assert (optimized - (base + sum(deltas) / 3)).abs().max() > 1e-3


def test_a_zero_task_vector_is_left_out_of_the_loss():
    deltas = task_vectors((6, 4), 2, seed=9)
    with_zero = wudi_task_vector([*[d.clone() for d in deltas], torch.zeros(6, 4)], 20)
    assert torch.isfinite(with_zero).all()
    torch.testing.assert_close(with_zero, wudi_task_vector([d.clone() for d in deltas], 20))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_inputs_device():
    deltas = task_vectors((64, 32), 3, seed=10)
    ours = wudi_task_vector([d.cuda() for d in deltas], 50)
    assert ours.device.type == "cuda"
    assert rel_diff(ours.cpu(), fusion_bench(deltas, 50)) < 1e-5


def test_bfloat16_inputs_are_optimized_in_float32():
    g = torch.Generator().manual_seed(12)
    base = torch.randn(8, 4, generator=g).bfloat16()
    models = [base + d.bfloat16() for d in task_vectors((8, 4), 3, seed=13, scale=0.1)]
    out = merge(base, models, iterations=50, learning_rate=1e-3)
    assert out.dtype == torch.bfloat16
    deltas = [(m - base).float() for m in models]
    ref = base.float() + wudi_task_vector(deltas, 50, 1e-3)
    assert rel_diff(out.float(), ref) < 1e-2
    assert (ref - (base.float() + sum(deltas))).abs().max() > 1e-2  # it did move
