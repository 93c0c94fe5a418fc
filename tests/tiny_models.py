"""Tiny Hugging Face checkpoints built on the fly, shared by the whole suite."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma")
VOCAB = 64


def tiny_config(arch: str, layers: int = 3, vocab: int = VOCAB, tied: bool | None = None, intermediate: int = 32):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=bool(tied))
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, tie_word_embeddings=bool(tied), sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=bool(tied))
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=4, tie_word_embeddings=True if tied is None else tied)
    else:
        raise ValueError(arch)
    return cfg


def write_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer over tokens t0..t{vocab-1}, enough for AutoTokenizer to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 3, vocab: int = VOCAB,
               tied: bool | None = None, dtype: torch.dtype = torch.float32, base: Path | None = None,
               noise: float = 0.05, safe_serialization: bool = True, tokenizer: bool = True,
               intermediate: int = 32) -> Path:
    """Save a tiny model. With ``base``, its weights are the base's plus seeded noise (a 'fine-tune')."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers, vocab, tied, intermediate)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    if base is not None:
        base_model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        base_state = base_model.state_dict()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = base_state[name]
                if src.shape == p.shape:
                    p.copy_(src + noise * torch.randn(p.shape, generator=gen))
                else:  # a different vocabulary: copy what lines up
                    rows = min(src.shape[0], p.shape[0])
                    p[:rows].copy_(src[:rows] + noise * torch.randn(p[:rows].shape, generator=gen))
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    if tokenizer:
        write_tokenizer(path, vocab)
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def finetuned_tensors(shape, k: int, seed: int, scale: float = 0.1):
    """A random base tensor and ``k`` 'fine-tunes' of it: base + a shared shift + their own noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = scale * torch.randn(shape, generator=g)
    return base, [base + common + scale * torch.randn(shape, generator=g) for _ in range(k)]


def max_relative_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def with_model_type(src: Path, dst: Path, model_type: str = "fancy_llm", custom_code: bool = True) -> Path:
    """A copy of the model folder ``src`` whose config names a model type transformers does not know,
    as a model that ships its own modeling code does (``auto_map``; no code is written)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type=model_type, architectures=["FancyForCausalLM"])
    if custom_code:
        config["auto_map"] = {"AutoConfig": "configuration_fancy.FancyConfig",
                              "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst
