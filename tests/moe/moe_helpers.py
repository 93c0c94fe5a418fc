"""Tiny expert families for the MoE tests: a base and fine-tunes of it, two layers each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tiny_models import make_model, write_tokenizer

LAYERS = 2


def make_qwen3(path: Path, seed: int, base: Path | None = None, noise: float = 0.05) -> Path:
    """tiny_models has no Qwen3; the same recipe: random weights, or the base's plus seeded noise."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    if base is not None:
        state = tf.AutoModelForCausalLM.from_pretrained(base).state_dict()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name] + noise * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def experts(tmp_path_factory):
    """``experts(arch, n)``: (base, [fine-tunes]) of a tiny two-layer family, cached per session."""
    cache: dict[tuple, tuple[Path, list[Path]]] = {}

    def family(arch: str = "llama", n: int = 2, **kw) -> tuple[Path, list[Path]]:
        key = (arch, n, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"moe-{arch}")
            if arch == "qwen3":
                base = make_qwen3(root / "base", 0)
                fts = [make_qwen3(root / f"ft{i}", i + 1, base=base) for i in range(n)]
            else:
                base = make_model(root / "base", arch, seed=0, layers=LAYERS, **kw)
                fts = [make_model(root / f"ft{i}", arch, seed=i + 1, base=base, noise=0.2, layers=LAYERS, **kw)
                       for i in range(n)]
            cache[key] = (base, fts)
        return cache[key]

    return family


def prompts_for(i: int) -> dict:
    """Distinct prompts per expert, in the tiny tokenizer's words t3..t63."""
    return {"positive_prompts": [f"t{5 + 7 * i} t{6 + 7 * i} t{7 + 7 * i}", f"t{8 + 7 * i} t{9 + 7 * i}"],
            "negative_prompts": [f"t{40 + i}"]}


def moe_config(base: Path, fts: list[Path], gate_mode: str = "hidden", shared: list[Path] = (), **extra) -> dict:
    config = {"base_model": str(base), "gate_mode": gate_mode, "dtype": "float32",
              "experts": [{"source_model": str(p), **prompts_for(i)} for i, p in enumerate(fts)]}
    if shared:
        config["shared_experts"] = [{"source_model": str(p), **prompts_for(len(fts) + i)} for i, p in enumerate(shared)]
    config.update(extra)
    return config


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
