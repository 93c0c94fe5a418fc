"""Zoo sizes and the Llama model they describe.

A ``ZooSize`` holds every setting that changes what the zoo builds; the cache key
is a hash of it, so editing a number here makes a fresh zoo rather than reusing
a stale one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergesmith.errors import InputError
from mergesmith.zoo.skills import Mixture


@dataclass(frozen=True)
class ZooSize:
    name: str
    # the world
    n_countries: int = 8
    n_cities: int = 120
    n_people: int = 120
    vocab_size: int = 1024
    # the model (Llama, untied embeddings, like the checkpoints merges usually see)
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    intermediate: int = 512
    # pretraining on the generic mixture
    mixture: Mixture = field(default_factory=Mixture)
    pretrain_steps: int = 500
    pretrain_batch: int = 32
    block: int = 128
    pretrain_lr: float = 2e-3
    # full fine-tunes: one expert per trained skill, and the multitask model
    train_examples: int = 4000  # per skill
    ft_steps: int = 200
    ft_batch: int = 32
    ft_lr: float = 2e-4
    # as many examples of each skill as its expert sees (8 skills x 200 steps); 1000
    # steps left it near chance on arithmetic
    multitask_steps: int = 1600
    # LoRA experts (PEFT format) for a few skills
    lora_skills: tuple[str, ...] = ("arithmetic", "strings")
    lora_rank: int = 8
    lora_steps: int = 200
    lora_lr: float = 1e-3
    # evaluation sets, per skill
    n_validation: int = 100
    n_test: int = 200
    device: str = "cpu"

    def settings(self) -> dict:
        """What the cache key hashes (the device changes nothing we keep)."""
        out = asdict(self)
        out.pop("device")
        return out


SIZES: dict[str, ZooSize] = {
    # For the test suite: a few seconds per stage on two CPU cores.
    "test": ZooSize(
        name="test", n_cities=40, n_people=40, vocab_size=384,
        hidden=64, layers=2, heads=4, intermediate=192,
        pretrain_steps=150, pretrain_batch=16, block=96,
        train_examples=600, ft_steps=30, ft_batch=16, multitask_steps=90,
        lora_skills=("strings",), lora_steps=30,
        n_validation=24, n_test=40,
    ),
    # The demo and the benchmark: 584 s on two idle CPU cores (docs/zoo.md, Sizes).
    "default": ZooSize(name="default"),
    # The scaling study's larger model: 11.4M parameters, the default's data and training
    # schedule, built on two CPU cores within the hour (docs/zoo.md, Sizes).
    "medium": ZooSize(name="medium", hidden=384, layers=6, heads=6, intermediate=1024),
    # For a GPU: a bigger model trained longer.
    "large": ZooSize(
        name="large", n_cities=200, n_people=200, vocab_size=2048,
        hidden=512, layers=8, heads=8, intermediate=1408,
        pretrain_steps=6000, pretrain_batch=64, block=128, pretrain_lr=1e-3,
        train_examples=8000, ft_steps=400, ft_batch=32, ft_lr=1e-4, multitask_steps=2400,
        lora_skills=("arithmetic", "strings", "passage", "facts"), lora_steps=400,
        lora_lr=1e-3, n_validation=200, n_test=500, device="auto",
    ),
}


def get_size(name: str, device: str | None = None) -> ZooSize:
    if name not in SIZES:
        raise InputError(f"zoo size {name!r} is not one of {', '.join(SIZES)}")
    size = SIZES[name]
    device = device or size.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return replace(size, device=device)


def make_model(size: ZooSize, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised Llama for ``size`` (seed the global RNG first)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(256, size.block),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
