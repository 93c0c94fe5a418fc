"""Router training: only the routers move (exact names), the rest is copied byte for byte."""

from __future__ import annotations

import json

import pytest
import torch

from moe_helpers import moe_config
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.moe import build_moe
from mergesmith.moe.train import router_names, train_routers
from tiny_models import load_state


def test_router_names_are_exact():
    names = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate.weight",
             "model.layers.3.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.0.w1.weight",
             "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.1.mlp.shared_expert.gate_proj.weight",
             "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.gate.weight.extra"]
    assert router_names(names) == ["model.layers.0.mlp.gate.weight", "model.layers.3.block_sparse_moe.gate.weight",
                                   "model.layers.1.mlp.shared_expert_gate.weight"]


@pytest.fixture
def tiny_task(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"id": str(i), "type": "generation", "prompt": f"t{5 + i % 7} t{9 + i % 5}", "references": [f" t{20 + i % 3}"]}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_routers_change_and_loss_falls(experts, tmp_path, tiny_task, arch):
    base, fts = experts(arch, 2)
    config = moe_config(base, fts, gate_mode="random", shared=[base] if arch == "qwen2" else [])
    moe = build_moe(config, tmp_path / "moe", progress=False).out_dir
    result = train_routers(moe, [tiny_task], tmp_path / "trained", steps=15, lr=5e-2, batch_size=4, progress=False)
    assert len(result.routers) == 2 * (2 if arch == "qwen2" else 1)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    before, after = load_state(moe), load_state(tmp_path / "trained")
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(router_names(before)) and len(changed) == len(result.routers)
    log = json.loads((tmp_path / "trained" / "mergesmith_router_training.json").read_text())
    assert log["options"]["steps"] == 15 and len(log["losses"]) == 15
    assert (tmp_path / "trained" / "tokenizer.json").read_bytes() == (moe / "tokenizer.json").read_bytes()


def test_problems_at_once(experts, tmp_path, tiny_task):
    base, _ = experts("llama", 2)
    with pytest.raises(InputError) as err:
        train_routers(base, [tmp_path / "missing.jsonl"], base / "inside", steps=0, lr=-1, progress=False)
    text = str(err.value)
    for expected in ("--steps 0", "--lr -1", "is not a mixture of experts", "lies inside the input", "missing.jsonl"):
        assert expected in text, (expected, text)


def test_cli(experts, tmp_path, tiny_task, capsys):
    base, fts = experts("llama", 2)
    moe = build_moe(moe_config(base, fts, gate_mode="random"), tmp_path / "moe", progress=False).out_dir
    argv = ["moe-train", str(moe), str(tmp_path / "t"), "--data", str(tiny_task), "--steps", "2", "--no-progress"]
    assert main(argv) == 0 and "trained 2 routers for 2 steps" in capsys.readouterr().out
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
