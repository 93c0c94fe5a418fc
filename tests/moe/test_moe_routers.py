"""gate_mode arrow (data-free) and ridge (closed form from the router's real input)."""

from __future__ import annotations

import torch

from moe_helpers import moe_config
from mergesmith.moe import build_moe
from mergesmith.moe.routers import RIDGE_LAMBDA, RIDGE_MARGIN, arrow_row, gated_mlp, ridge_router
from tiny_models import load_state

ACT = torch.nn.functional.silu


def _mlp(seed: int, hidden: int = 6, inter: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(inter, hidden, generator=g), "up": torch.randn(inter, hidden, generator=g),
            "down": torch.randn(hidden, inter, generator=g)}


def test_arrow_rank_one_delta_gives_its_direction_sign_and_scale():
    base = _mlp(0)
    v = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5, 0.0])
    v = v / v.norm()
    expert = dict(base, gate=base["gate"] + torch.outer(torch.tensor([1.0, 0.0, -2.0, 0.5]), v),
                  up=base["up"] + torch.outer(torch.tensor([0.0, 1.0, 1.0, 0.0]), v))
    w = torch.linspace(0.5, 1.5, 6)
    row = arrow_row(base, expert, w, ACT)
    direction = row / row.norm()
    assert abs(abs(direction @ v) - 1) < 1e-5  # the top right singular vector of the delta
    assert abs((row * w).norm() - 1) < 1e-5  # logits of unit spread over unit-RMS inputs x = w * n
    s = w.norm()
    change = [(gated_mlp(sign * s * v[None], **expert, act=ACT) - gated_mlp(sign * s * v[None], **base, act=ACT)).norm()
              for sign in (1, -1)]
    assert torch.sign(direction @ v) == (1 if change[0] >= change[1] else -1)  # the side the expert changed more


def test_arrow_expert_equal_to_base_gets_zero_row():
    base = _mlp(1)
    assert torch.equal(arrow_row(base, dict(base), torch.ones(6), ACT), torch.zeros(6))


def test_ridge_router_is_the_weighted_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) + i for i, n in enumerate((7, 3, 11))]
    router = ridge_router(torch.stack([x.T @ x for x in xs]), torch.stack([x.sum(0) for x in xs]),
                          torch.tensor([x.shape[0] for x in xs]))
    # the same problem as one stacked least-squares system: rows scaled by 1/sqrt(N_e), plus sqrt(lambda) I
    a = sum(x.T @ x / x.shape[0] for x in xs)
    lam = RIDGE_LAMBDA * a.trace() / 5
    rows = torch.cat([x / x.shape[0] ** 0.5 for x in xs] + [lam.sqrt() * torch.eye(5, dtype=torch.float64)])
    targets = torch.cat([RIDGE_MARGIN * torch.nn.functional.one_hot(torch.full((x.shape[0],), i), 3).double()
                         / x.shape[0] ** 0.5 for i, x in enumerate(xs)] + [torch.zeros(5, 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(rows, targets).solution.T
    torch.testing.assert_close(router, expected.float(), rtol=1e-5, atol=1e-5)


def test_ridge_routes_each_experts_prompts_to_it(experts, tmp_path):
    import transformers as tf

    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="ridge", experts_per_token=1)
    result = build_moe(config, tmp_path / "moe", progress=False)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "moe")
    for e, expert in enumerate(config["experts"]):
        for prompt in expert["positive_prompts"]:
            ids = tok(tok.bos_token + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                first_layer = model(ids, output_router_logits=True).router_logits[0]
            # the prompt's own tokens; BOS, the same in every expert's prompts, is split between them
            assert (first_layer[1:].argmax(-1) == e).all(), (e, prompt, first_layer)
            assert abs(first_layer[1:, e].mean() - RIDGE_MARGIN) < 0.1
    assert result.gates.shape == (2, 2, 16)


def test_arrow_builds_loadable_models_with_a_zero_shared_gate(experts, tmp_path):
    import transformers as tf

    base, fts = experts("qwen2", 3)
    config = moe_config(base, fts[:2], gate_mode="arrow", shared=fts[2:])
    for e in config["experts"] + config["shared_experts"]:
        del e["positive_prompts"], e["negative_prompts"]  # data-free
    build_moe(config, tmp_path / "moe", progress=False)
    state = load_state(tmp_path / "moe")
    assert not state["model.layers.0.mlp.shared_expert_gate.weight"].any()
    assert state["model.layers.1.mlp.gate.weight"].abs().sum(-1).min() > 0
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_routing_accuracy_of_ridge_on_its_prompts(experts, tmp_path, capsys):
    import json

    from mergesmith.cli import main
    from mergesmith.moe.routing import routing_accuracy

    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="ridge", experts_per_token=1)
    build_moe(config, tmp_path / "moe", progress=False)
    files = []
    for e, expert in enumerate(config["experts"]):
        path = tmp_path / f"skill{e}.jsonl"
        path.write_text("".join(json.dumps({"id": str(i), "type": "generation", "prompt": p, "references": [""]}) + "\n"
                                for i, p in enumerate(expert["positive_prompts"])))
        files.append([path])
    report = routing_accuracy(tmp_path / "moe", files)
    assert report.tokens.tolist() == [5, 5]  # BOS not counted
    assert report.hits[:, 0].tolist() == [5, 5]  # the first layer reads exactly what ridge was fit on
    assert 0.5 < report.accuracy <= 1.0
    assert main(["moe-routing", str(tmp_path / "moe"), "--expert", str(files[0][0]), "--expert", str(files[1][0])]) == 0
    assert "routing accuracy (mean over experts)" in capsys.readouterr().out
