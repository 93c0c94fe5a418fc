"""The output folders: transformers loads and runs each architecture; tensors are the experts'."""

from __future__ import annotations

import pytest
import torch

from moe_helpers import moe_config
from mergesmith.moe import build_moe
from mergesmith.moe.build import TOKENIZER_FILES
from tiny_models import load_state

IDS = torch.tensor([[1, 5, 6, 7, 8, 20, 21], [1, 12, 13, 14, 40, 41, 42]])


def load(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(path_or_model):
    model = load(path_or_model) if not isinstance(path_or_model, torch.nn.Module) else path_or_model
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch, shared, cls, router", [
    ("llama", 0, "MixtralForCausalLM", "model.layers.1.block_sparse_moe.gate.weight"),
    ("mistral", 0, "MixtralForCausalLM", "model.layers.1.block_sparse_moe.gate.weight"),
    ("qwen2", 1, "Qwen2MoeForCausalLM", "model.layers.1.mlp.gate.weight"),
    ("llama", 1, "Qwen2MoeForCausalLM", "model.layers.1.mlp.gate.weight"),  # no q/k/v biases: qkv_bias false
    ("qwen3", 0, "Qwen3MoeForCausalLM", "model.layers.1.mlp.gate.weight"),
])
def test_transformers_loads_and_generates(experts, tmp_path, arch, shared, cls, router):
    base, fts = experts(arch, 2 + shared)
    out = tmp_path / "moe"
    result = build_moe(moe_config(base, fts[:2], shared=fts[2:]), out, progress=False)
    import transformers as tf

    model, info = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    generated = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 4)
    state = load_state(out)
    assert torch.equal(state[router], result.gates[1, :2])
    src = load_state(fts[1])
    if cls == "MixtralForCausalLM":
        assert torch.equal(state["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                           src["model.layers.0.mlp.gate_proj.weight"])
        assert torch.equal(state["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                           src["model.layers.0.mlp.down_proj.weight"])
    else:
        assert torch.equal(state["model.layers.0.mlp.experts.1.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"])
    if shared:
        assert torch.equal(state["model.layers.1.mlp.shared_expert.down_proj.weight"],
                           load_state(fts[2])["model.layers.1.mlp.down_proj.weight"])
        assert torch.equal(state["model.layers.1.mlp.shared_expert_gate.weight"], result.gates[1, 2:])
    base_state = load_state(base)
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], base_state["model.layers.1.self_attn.q_proj.weight"])
    for name in TOKENIZER_FILES:  # copied unchanged (mergekit adds pad_token: docs/moe.md)
        if (base / name).is_file():
            assert (out / name).read_bytes() == (base / name).read_bytes()


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen3", False)])
def test_experts_all_the_base_compute_the_base(experts, tmp_path, arch, tied):
    """Top-k weights sum to one, so a mixture of identical experts is that dense model (tied
    embeddings stay tied: no lm_head is written)."""
    base, _ = experts(arch, 2, **({"tied": True} if tied else {}))
    config = moe_config(base, [base, base], gate_mode="random")
    build_moe(config, tmp_path / "moe", progress=False)
    torch.testing.assert_close(logits(tmp_path / "moe"), logits(base), rtol=1e-5, atol=1e-5)
    assert ("lm_head.weight" in load_state(tmp_path / "moe")) == (not tied)


def test_noise_and_residual_scale(experts, tmp_path):
    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="uniform_random")
    config["experts"][0].update(noise_scale=0.01, residual_scale=0.5)
    build_moe(config, tmp_path / "a", progress=False, random_seed=3)
    build_moe(config, tmp_path / "b", progress=False, random_seed=3)
    a, src = load_state(tmp_path / "a"), load_state(fts[0])
    assert all(torch.equal(a[k], v) for k, v in load_state(tmp_path / "b").items())  # seeded: reproducible
    gate = a["model.layers.0.block_sparse_moe.experts.0.w1.weight"] - src["model.layers.0.mlp.gate_proj.weight"]
    assert 0.007 < gate.std().item() < 0.013
    down = a["model.layers.0.block_sparse_moe.experts.0.w2.weight"] - 0.5 * src["model.layers.0.mlp.down_proj.weight"]
    assert 0.003 < down.std().item() < 0.007  # the noise is scaled too: (W + n) * 0.5
    assert torch.equal(a["model.layers.0.block_sparse_moe.experts.1.w2.weight"], load_state(fts[1])["model.layers.0.mlp.down_proj.weight"])
    bound = 16 ** -0.5
    router = a["model.layers.0.block_sparse_moe.gate.weight"]
    assert router.abs().max() <= bound and router.abs().max() > bound / 2


def test_output_dtype_and_shards(experts, tmp_path):
    base, fts = experts("llama", 2)
    build_moe(moe_config(base, fts, gate_mode="random", dtype="bfloat16"), tmp_path / "moe", progress=False,
              out_shard_size=5_000)
    assert len(list((tmp_path / "moe").glob("model-*.safetensors"))) > 1
    assert {t.dtype for t in load_state(tmp_path / "moe").values()} == {torch.bfloat16}
    assert load(tmp_path / "moe").config.num_local_experts == 2


def test_options_object_is_not_changed(experts, tmp_path):
    from mergesmith.moe import MoEOptions

    base, fts = experts("llama", 2)
    options = MoEOptions()
    build_moe(moe_config(base, fts, gate_mode="random"), tmp_path / "moe", options=options, progress=False)
    assert options.progress is True
    with pytest.raises(TypeError):
        build_moe(moe_config(base, fts), tmp_path / "x", dry_run=True, nonsense=1)


def test_interrupted_build_leaves_nothing(experts, tmp_path, monkeypatch):
    import mergesmith.moe.build as build

    base, fts = experts("llama", 2)
    real, calls = build.produce, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(build, "produce", failing)
    with pytest.raises(KeyboardInterrupt):
        build_moe(moe_config(base, fts, gate_mode="random"), tmp_path / "moe", progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_shared_tensors_merged_from_the_experts(experts, tmp_path):
    """Branch-Train-Mix: attention, norms and embeddings averaged over the experts (linear)."""
    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="random", shared_tensors={"merge_method": "linear",
                                                                      "parameters": {"weight": 1.0}})
    result = build_moe(config, tmp_path / "moe", progress=False)
    assert "linear of the experts' model.layers.0.self_attn.q_proj.weight" in result.plan.describe()
    out, a, b = load_state(tmp_path / "moe"), load_state(fts[0]), load_state(fts[1])
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(out[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.0.w1.weight"], a["model.layers.0.mlp.gate_proj.weight"])
    assert load(tmp_path / "moe").generate(IDS[:1], max_new_tokens=2, do_sample=False).shape[1] == IDS.shape[1] + 2


def test_shared_tensors_problems_reported_with_the_others(experts, tmp_path):
    from mergesmith.errors import InputError

    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="nope", shared_tensors={"merge_method": "no_such_method"})
    with pytest.raises(InputError) as err:
        build_moe(config, tmp_path / "moe", progress=False, device="cuda:7")
    text = str(err.value)
    assert "gate_mode = 'nope'" in text and "shared_tensors: merge_method = 'no_such_method' is not a known" in text
    assert text.count("cuda:7") == 1


def test_shared_tensors_ties_uses_the_base(experts, tmp_path):
    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="random",
                        shared_tensors={"merge_method": "ties", "parameters": {"density": 1.0, "weight": 1.0}})
    build_moe(config, tmp_path / "moe", progress=False)
    out, b0, a, b = (load_state(p) for p in (tmp_path / "moe", base, *fts))
    name = "model.layers.0.self_attn.q_proj.weight"
    tau = torch.stack([a[name] - b0[name], b[name] - b0[name]])  # TIES at density 1: elect, disjoint mean
    keep = torch.sign(tau) == torch.sign(tau.sum(0))
    expected = b0[name] + (tau * keep).sum(0) / keep.sum(0).clamp(min=1)
    torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_a_routed_model_is_evaluated_like_any_model(experts, tmp_path):
    import json

    from mergesmith.evaluate import evaluate, load_tasks

    base, fts = experts("llama", 2)
    build_moe(moe_config(base, fts, gate_mode="cheap_embed"), tmp_path / "moe", progress=False)
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"id": str(i), "type": "multiple_choice", "prompt": f"t{5 + i} t6",
                                        "choices": [" t7", " t8"], "answer": i % 2}) + "\n" for i in range(4)))
    result = evaluate(str(tmp_path / "moe"), load_tasks([task]), progress=False)
    assert 0.0 <= result.tasks[0].score <= 1.0
