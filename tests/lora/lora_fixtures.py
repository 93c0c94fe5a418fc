"""Tiny PEFT adapters and the references the LoRA tests check against (PEFT's own folding)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

# The suite's adapter builder and PEFT folding (merge_and_unload), shared with the model+adapter tests.
from tests.engine.test_lora_refs import make_adapter, peft_merged as load_folded  # noqa: E402,F401


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """dW of every weight the adapter changes, as PEFT folds it: merge_and_unload minus the base."""
    base = base_state(model_dir)
    folded = load_folded(model_dir, adapter)
    return {k: folded[k] - base[k] for k in base if not torch.equal(folded[k], base[k])}


def write_recipe(path: Path, method: str, adapters: list[Path], model_params: list[dict] | None = None,
                 **extra) -> Path:
    models = [{"model": str(a), **({"parameters": p} if p else {})}
              for a, p in zip(adapters, model_params or [{}] * len(adapters))]
    path.write_text(yaml.safe_dump({"merge_method": method, "models": models, **extra}))
    return path


def adapter_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())
