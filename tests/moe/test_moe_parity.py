"""Parity with mergekit-moe 0.1.5, run in-process on the same local folders.

Tolerances:
- ``cheap_embed`` and ``random``-free paths that never run the model: mergekit sums the same
  float32 embedding rows, so routers agree to float32 rounding (1e-6) and logits to 1e-5.
- ``hidden`` as mergekit ships it runs the base model in bfloat16 (``router.get_hidden_states``
  after ``from_pretrained(torch_dtype=torch.bfloat16)``); we run it in float32. Each router row is
  a unit vector, so a bfloat16 forward (relative rounding 2^-8 per stored value) moves each entry
  by a few 2^-8 at most: we allow 4 * 2^-8 = 1/64 per entry, and logits within 1e-2 of their
  scale. With mergekit's model forced to float32 the two computations agree to 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_helpers import moe_config
from mergesmith.moe import build_moe
from mergesmith.moe.gates import prompt_summarizer
from tiny_models import load_state

BF16_ENTRY_TOLERANCE = 4 * 2 ** -8
IDS = torch.tensor([[1, 5, 6, 7, 8, 20, 21, 30], [1, 12, 13, 14, 40, 41, 42, 43], [1, 19, 20, 21, 3, 4, 5, 6]])


def run_mergekit(config: dict, out, float32: bool = False, monkeypatch=None):
    import transformers
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    import mergekit.moe.router as router
    from mergekit.scripts.moe import build

    if float32:
        class Float32Loader:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                kwargs["torch_dtype"] = torch.float32
                return transformers.AutoModelForCausalLM.from_pretrained(*args, **kwargs)
        monkeypatch.setattr(router, "AutoModelForCausalLM", Float32Loader)
    build(MoEMergeConfig.model_validate(config), str(out), MergeOptions(device="cpu"), device="cpu")
    return out


def routers(path, names):
    state = load_state(path)
    return [state[n] for n in names]


def logits(path):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def both(config: dict, tmp_path, monkeypatch=None, float32: bool = False):
    """Build ``config`` with mergesmith and with mergekit: (router pairs (ours, theirs), our logits,
    their logits). mergekit writes Mixtral routers under ``mlp.``, transformers 5 saves them under
    ``block_sparse_moe.``; both load the same."""
    ours = build_moe(config, tmp_path / "ours", progress=False, prompt_dtype="float32" if float32 else "bfloat16")
    theirs = run_mergekit(config, tmp_path / "theirs", float32=float32, monkeypatch=monkeypatch)
    shared = bool(config.get("shared_experts"))
    names = [ours.plan.arch.router_name(i) for i in range(2)] + \
        [ours.plan.arch.shared_gate_name(i) for i in range(2) if shared]
    their_names = [n.replace("block_sparse_moe", "mlp") for n in names]
    pairs = list(zip(routers(ours.out_dir, names), routers(theirs, their_names)))
    return pairs, logits(ours.out_dir), logits(theirs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cheap_embed_matches_mergekit(experts, tmp_path, arch):
    # mergekit 0.1.5 opens readers for the base and the routed experts only, so its shared expert
    # must be one of those (here the base, the usual choice); ours may be any model.
    base, fts = experts(arch, 2)
    pairs, ours, theirs = both(moe_config(base, fts, gate_mode="cheap_embed",
                                          shared=[base] if arch == "qwen2" else []), tmp_path)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # mergekit saves the tokenizer with the left padding (pad = BOS) it encoded the prompts with;
    # ours is the base's, byte for byte (test_outputs.py)
    padding = json.loads((tmp_path / "theirs" / "tokenizer.json").read_text())["padding"]
    assert padding["direction"] == "Left" and json.loads((base / "tokenizer.json").read_text())["padding"] is None


def test_hidden_llama_matches_mergekit_as_shipped_in_bfloat16(experts, tmp_path):
    base, fts = experts("llama", 2)
    pairs, ours, theirs = both(moe_config(base, fts, gate_mode="hidden"), tmp_path)
    for a, b in pairs:
        assert (a - b).abs().max() <= BF16_ENTRY_TOLERANCE
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 1 - 1e-3
    assert (ours - theirs).abs().max() <= 1e-2 * theirs.abs().max()


@pytest.mark.parametrize("arch, mode", [("llama", "hidden"), ("llama", "hidden_last"), ("qwen2", "hidden")])
def test_hidden_matches_mergekit_in_float32(experts, tmp_path, monkeypatch, arch, mode):
    base, fts = experts(arch, 2)
    config = moe_config(base, fts, gate_mode=mode, shared=[base] if arch == "qwen2" else [])
    pairs, ours, theirs = both(config, tmp_path, monkeypatch, float32=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_hidden_avg_equal_length_prompts_match_mergekit(experts, tmp_path, monkeypatch):
    """Without padding the two averages are the same; with it, mergekit's counts the pads (below)."""
    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="hidden_avg")
    for i, e in enumerate(config["experts"]):
        e["positive_prompts"] = [f"t{5 + i} t{6 + i} t{7 + i}", f"t{20 + i} t{21 + i} t{22 + i}"]
        e["negative_prompts"] = [f"t{40 + i} t{41 + i} t{42 + i}"]
    pairs, _, _ = both(config, tmp_path, monkeypatch, float32=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_hidden_avg_ignores_padding(experts):
    """Ours: each prompt's mean over its own tokens, whatever it is batched with. mergekit divides
    the padded sum by the padded length, so a short prompt beside a long one counts its pads."""
    base, _ = experts("llama", 2)
    summarize = prompt_summarizer("hidden_avg", base, 2, "cpu")
    short, long = "t5 t6", "t20 t21 t22 t23 t24 t25"
    together = summarize([short, long])
    apart = (summarize([short]) + summarize([long])) / 2
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)

    import transformers as tf
    from mergekit.moe.router import get_hidden_states, tokenize_prompts

    tokenizer = tf.AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.bos_token  # as mergekit-moe sets them
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = get_hidden_states(model, tokenize_prompts([short, long], tokenizer), average=True)
    assert (theirs - together).abs().max() > 1e-2  # the four pads of the short prompt, averaged in


def test_hidden_in_bfloat16_like_mergekit(experts, tmp_path):
    """With the prompt pass in bfloat16 (our default, as mergekit), the remaining difference is where
    the states are averaged (mergekit in bfloat16, we in float32). The predicted peak of a float32
    file loaded in bfloat16 is the bfloat16 model plus the file's pages read while converting."""
    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="hidden")
    ours = build_moe(config, tmp_path / "ours", progress=False)
    assert ours.plan.prompt_dtype == torch.bfloat16
    theirs = run_mergekit(config, tmp_path / "theirs")
    float32_plan = build_moe(config, tmp_path / "x", dry_run=True, prompt_dtype="float32").plan
    assert ours.plan.gate_pass_bytes() * 2 == float32_plan.gate_pass_bytes() * 3  # the experts are float32
    for i in range(2):
        a = load_state(ours.out_dir)[ours.plan.arch.router_name(i)]
        b = load_state(theirs)[f"model.layers.{i}.mlp.gate.weight"]
        assert (a - b).abs().max() <= 2 ** -8


def test_prompts_run_in_batches_give_the_same_rows(experts):
    base, _ = experts("llama", 2)
    prompts = [" ".join(f"t{5 + (i * j) % 50}" for j in range(1 + i % 4)) for i in range(11)]
    for mode in ("hidden", "hidden_avg"):
        batched = prompt_summarizer(mode, base, 2, "cpu", batch_size=4)(prompts)
        whole = prompt_summarizer(mode, base, 2, "cpu", batch_size=100)(prompts)
        torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)
