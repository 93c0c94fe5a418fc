"""LoRA experts in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

Merging tools meet LoRA adapters as often as full checkpoints, so the zoo ships a
few: same data and step count as the full expert of that skill, adapters on every
linear layer of the blocks.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from mergesmith.zoo.model import ZooSize
from mergesmith.zoo.skills import Example
from mergesmith.zoo.train import TrainLog, finetune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(model, tokenizer, examples: list[Example], size: ZooSize, *, seed: int,
               progress: bool = True) -> tuple[object, TrainLog]:
    """Wrap ``model`` with fresh adapters and train only them; returns the PEFT model."""
    config = LoraConfig(r=size.lora_rank, lora_alpha=2 * size.lora_rank, lora_dropout=0.0,
                        target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    log = finetune(peft_model, tokenizer, examples, steps=size.lora_steps, batch=size.ft_batch,
                   lr=size.lora_lr, seed=seed, desc="lora", device=size.device, progress=progress)
    return peft_model, log
