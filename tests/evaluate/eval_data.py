"""Tiny local models and tokenizers for the evaluation tests (no hub, no network).

The tokenizer is a byte-level BPE trained on a few sentences, with a BOS added by
its post-processor (as Llama tokenizers do), so the tests exercise the special
token handling that real checkpoints need. The model is a 2-layer Llama with
hidden size 32 and a large initializer range, so that choice log-likelihoods are
well separated (a default-initialized model gives near-uniform logits and
near-ties that would make prediction comparisons fragile).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "Question: What is the capital of France?\nAnswer: Paris",
    "Question: Which planet is the largest?\nAnswer: Jupiter",
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat and looked at the bird in the tree.",
    "Water boils at one hundred degrees. Ice melts when it is warm.",
    "The sun rises in the east and sets in the west every day.",
    "Choose the best answer: A, B, C or D. The answer is B.",
    "red green blue yellow orange purple black white",
    "one two three four five six seven eight nine ten",
    "Summarize: the meeting was moved to Friday because of the storm.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_model(tokenizer, seed: int = 0, max_positions: int = 256, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MC_ROWS = [
    {"id": "q1", "type": "multiple_choice", "prompt": "Question: What is the capital of France?\nAnswer:",
     "choices": [" Paris", " Jupiter", " the mat", " blue"], "answer": 0},
    {"id": "q2", "type": "multiple_choice", "prompt": "Question: Which planet is the largest?\nAnswer:",
     "choices": [" Jupiter", " Paris", " ice", " seven eight"], "answer": 0},
    {"id": "q3", "type": "multiple_choice", "prompt": "The quick brown fox jumps over the",
     "choices": [" lazy dog.", " cat", " sun rises in the east", " tree"], "answer": 0},
    {"id": "q4", "type": "multiple_choice", "prompt": "Water boils at one hundred",
     "choices": [" degrees.", " days", " birds"], "answer": 0},
    {"id": "q5", "type": "multiple_choice", "prompt": "Choose the best answer: A, B, C or D. The answer is",
     "choices": [" A", " B", " C", " D"], "answer": 1},
    {"id": "q6", "type": "multiple_choice", "prompt": "red green blue yellow",
     "choices": [" orange purple", " black", " white", " one two three"], "answer": 2},
]

GEN_ROWS = [
    {"id": "g1", "type": "generation", "prompt": "Question: What is the capital of France?\nAnswer:",
     "references": ["Paris"]},
    {"id": "g2", "type": "generation", "prompt": "one two three four",
     "references": ["five six", "five"]},
    {"id": "g3", "type": "generation", "prompt": "Summarize: the meeting was moved",
     "references": ["to Friday"]},
]
