"""What a tensor name says about its place in a decoder-only model.

Hugging Face causal LMs name their per-layer tensors ``<prefix>.<i>.<suffix>``
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.3.attn.c_attn.weight``).
Everything else is either before the layers (token embeddings) or after them
(final norm, ``lm_head``). That is all the engine needs to plan a merge, so no
per-architecture table is kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer|decoder_layers))\.(?P<index>\d+)\.(?P<suffix>.+)$")
EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "wpe", "embed_positions")
VOCAB_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "lm_head", "embed_out", "output.weight")
# Buffers some .bin checkpoints carry that are not parameters of the model.
SKIP_RE = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    suffix: str

    def at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.suffix}"


def split_layer_name(name: str) -> Optional[LayerName]:
    m = LAYER_RE.match(name)
    if not m:
        return None
    return LayerName(m["prefix"], int(m["index"]), m["suffix"])


def is_pre_layer(name: str) -> bool:
    """Token/position embeddings come before the layers; other non-layer tensors after."""
    return any(h in name for h in EMBED_HINTS)


def is_vocab_tensor(name: str) -> bool:
    return any(h in name for h in VOCAB_HINTS)


def is_skipped(name: str) -> bool:
    return bool(SKIP_RE.search(name))


def tied_embedding_name(names: set[str]) -> Optional[str]:
    for candidate in ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                      "gpt_neox.embed_in.weight", "tok_embeddings.weight"):
        if candidate in names:
            return candidate
    return None


def num_layers(config: dict) -> Optional[int]:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        return num_layers(text)
    return None


def vocab_tokens(model_dir: Path, ids: list[int], limit: int = 8) -> list[str]:
    """Token strings for ``ids`` from the model's tokenizer.json, for warnings (best effort)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file() or not ids:
        return []
    try:
        data = json.loads(path.read_text())
        vocab = {v: k for k, v in data.get("model", {}).get("vocab", {}).items()}
        for t in data.get("added_tokens", []):
            vocab[t["id"]] = t["content"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []
    return [repr(vocab[i]) for i in ids[:limit] if i in vocab]
