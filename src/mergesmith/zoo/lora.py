"""LoRA experts in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

Merging tools meet LoRA adapters as often as full checkpoints, so the zoo ships a
few: same data and step count as the full expert of that skill, adapters on every
linear layer of the blocks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from mergesmith.evaluate.model import quiet_loading
from mergesmith.zoo.model import ZooSize
from mergesmith.zoo.skills import Example
from mergesmith.zoo.train import TrainLog, finetune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(model, tokenizer, examples: list[Example], size: ZooSize, *, seed: int,
               progress: bool = True) -> tuple[object, TrainLog]:
    """Wrap ``model`` with fresh adapters and train only them; returns the PEFT model."""
    config = LoraConfig(r=size.lora_rank, lora_alpha=2 * size.lora_rank, lora_dropout=0.0,
                        target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    log = finetune(peft_model, tokenizer, examples, steps=size.lora_steps, batch=size.ft_batch,
                   lr=size.lora_lr, seed=seed, desc="lora", device=size.device, progress=progress)
    return peft_model, log


def materialize_lora(adapter: Path, base: Path, out: Path) -> Path:
    """Save ``base`` with the adapter folded into its weights (W + scale * B @ A).

    The result is an ordinary checkpoint, so the evaluation harness and the merge
    engine read it like any full expert. Uses PEFT's own ``merge_and_unload``: the
    reference for what the adapter means. The tokenizer is the base's: a merged or extracted
    adapter folder carries none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading(), warnings.catch_warnings():
        # PEFT reads transformers' deprecated is_gradient_checkpointing: their note, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out
