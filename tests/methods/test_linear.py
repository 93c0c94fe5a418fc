import pytest
import torch

from mergesmith.methods import TensorGroup, get_method


def run(name, tensors, params, model_params, base_index=None, seed=0):
    spec = get_method(name)
    return spec.fn(TensorGroup(name="t", tensors=tensors, params=params,
                               model_params=model_params, base_index=base_index,
                               generator=torch.Generator().manual_seed(seed)))


def test_linear_hand_computed():
    a = torch.tensor([1.0, 2.0, -4.0])
    b = torch.tensor([3.0, 0.0, 4.0])
    out = run("linear", [a, b], {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}])
    # (1*a + 3*b) / 4
    assert torch.allclose(out, torch.tensor([2.5, 0.5, 2.0]))
    out = run("linear", [a, b], {"normalize": False}, [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, torch.tensor([10.0, 2.0, 8.0]))


def test_linear_one_model_is_identity():
    a = torch.randn(4, 5)
    out = run("linear", [a], {"normalize": True}, [{"weight": 0.3}])
    assert torch.allclose(out, a)


def test_linear_zero_weights_refused():
    spec = get_method("linear")
    assert spec.check_params({"normalize": True}, [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ValueError, match="sum to zero"):
        run("linear", [torch.ones(2), torch.ones(2)], {"normalize": True},
            [{"weight": 1.0}, {"weight": -1.0}])
