"""The model side of an evaluation: loading, special tokens, context length, forward.

A model is a folder (or a hub id, which needs the network), or a live
``transformers`` model with its tokenizer, so that a search can evaluate a merge
without writing it to disk. A live model stays where it is unless ``device`` is
given, and gets its training flag back afterwards.
"""

from __future__ import annotations

import contextlib

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mergesmith.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_MAX_LENGTH = 2048


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    max_length: int
    prefix_ids: list[int]  # special tokens the tokenizer puts before a text (usually BOS)
    pad_id: int
    was_training: bool = False
    _keeps_logits: bool = field(default=False, repr=False)
    # newer transformers name the key/value cache `cache` and warn on every use of
    # the old `past_key_values`, in the call and on the output alike
    _cache_name: str = field(default="past_key_values", repr=False)

    @property
    def prefix_text(self) -> str:
        return self.tokenizer.decode(self.prefix_ids) if self.prefix_ids else ""

    @property
    def start_id(self) -> Optional[int]:
        """The token that conditions an empty context (BOS, else EOS), as lm-eval does."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids, no special tokens. Over-long texts are fine: we truncate them ourselves
        (and count it), so the tokenizer's "longer than the maximum sequence length" warning
        is switched off (``verbose=False``) rather than shown to the user as a fault."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
                past_key_values: Any = None, use_cache: bool = False, last_only: bool = False,
                parameters: Optional[dict[str, torch.Tensor]] = None) -> Any:
        """The model's output; with ``parameters`` (name -> tensor), the model run with those tensors in
        place of its own (``torch.func.functional_call``; tied weights stay tied), so that gradients
        flow to whatever computed them, e.g. merge coefficients (``mergesmith.learn``)."""
        kwargs: dict[str, Any] = {}
        if last_only and self._keeps_logits:
            kwargs["logits_to_keep"] = 1  # skip the vocabulary projection of every prompt position
        if past_key_values is not None:
            kwargs[self._cache_name] = past_key_values
        kwargs.update(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                      position_ids=position_ids.to(self.device), use_cache=use_cache)
        if parameters is not None:
            return torch.func.functional_call(self.model, parameters, (), kwargs)
        return self.model(**kwargs)

    def cache_of(self, output: Any) -> Any:
        """The key/value cache a forward pass returned, under whichever name this transformers uses."""
        return getattr(output, self._cache_name, None)

    def restore(self) -> None:
        if self.was_training:
            self.model.train()


def _resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not known; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def _load_tokenizer(source: str, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if not Path(source).expanduser().exists():
            raise InputError(f"{where}: could not load a tokenizer: not a local folder, and the Hugging Face "
                             f"Hub could not provide it ({reason}). Offline, give a local folder.") from None
        if "trust_remote_code" in str(err):
            reason = ("its tokenizer_config.json names a tokenizer class that only code in the folder defines, "
                      "and mergesmith never runs code from a model folder (no trust_remote_code)")
        raise InputError(f"{where}: no usable tokenizer ({reason}); save the tokenizer beside the model "
                         "(tokenizer.json, tokenizer_config.json) or pass --tokenizer PATH") from None


def split_adapter_ref(path: str) -> tuple[str, Optional[str]]:
    """``"model+adapter"`` (a merge recipe's LoRA reference) -> its two folders; else ``(path, None)``."""
    from mergesmith.checkpoint.lora import split_lora_ref

    if "+" not in path or Path(path).expanduser().exists():
        return path, None
    try:
        return split_lora_ref(path)
    except ValueError:
        return path, None


def model_path_problems(path: str) -> list[str]:
    """Why ``path`` is not a model folder transformers can load without running its code; [] for a
    hub id (the hub is asked when it loads). ``model+adapter`` checks both folders."""
    from mergesmith.checkpoint.config import runnable_problems

    path, adapter = split_adapter_ref(path)
    if adapter is not None and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        return [f"{adapter}: not a LoRA adapter folder (no adapter_config.json)"] + model_path_problems(path)
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        return [f"{path}: not a model folder (no config.json); give the folder a merge or save_pretrained wrote"]
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
    if looks_local and not local.exists():
        return [f"{path}: no such model folder"]
    return runnable_problems(local)


def _check_model_path(path: str) -> Path:
    problems = model_path_problems(path)
    if problems:
        raise InputError(problems)
    return Path(path).expanduser()


@contextlib.contextmanager
def quiet_loading():
    """No transformers progress bar ("Loading weights ...") while a model loads: our commands
    show their own progress, and --no-progress must mean none at all."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_from_path(path: str, dtype: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    local = _check_model_path(path)
    try:
        with quiet_loading():
            return AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else path, dtype=dtype,
                                                        trust_remote_code=trust_remote_code)
    except OSError as err:
        raise InputError(f"{path}: could not load the model: not a local folder, and the Hugging Face Hub "
                         f"could not provide it ({str(err).splitlines()[0]}). Offline, give a local "
                         "folder.") from None


def fold_adapter(hf_model: Any, base: str, adapter: str) -> None:
    """Fold a PEFT LoRA adapter into a loaded model in place: each adapted weight becomes
    ``W + scale * B @ A``, read through ``checkpoint.lora`` exactly as a merge reads it."""
    from mergesmith.checkpoint.lora import LoraCheckpoint
    from mergesmith.checkpoint.reader import Checkpoint

    lora = LoraCheckpoint.open(Checkpoint.open(Path(base).expanduser()), Path(adapter).expanduser())
    try:
        state = hf_model.state_dict()
        with torch.no_grad():
            for name in sorted(set(lora.deltas) | set(lora.replaced)):
                state[name].copy_(lora.read(name).to(state[name].dtype))
    finally:
        lora.close()


def context_length(model: Any, tokenizer: Any) -> int:
    """The model's context window: its config first, then the tokenizer, else 2048 (lm-eval's order)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return DEFAULT_MAX_LENGTH


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer adds in front of a text (BOS for Llama-style tokenizers).

    Contexts are encoded without special tokens and this prefix is put back by hand,
    so that special tokens a tokenizer would append (an EOS) never land inside a
    choice, and a prompt that already starts with them does not get them twice.
    """
    probe = "a b"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def load_model(model: Any, tokenizer: Any = None, *, device: Optional[str] = None,
               dtype: Union[str, torch.dtype, None] = "auto", max_length: Optional[int] = None,
               trust_remote_code: bool = False) -> LoadedModel:
    if isinstance(model, (str, Path)):
        name = str(model)
        dev = torch.device(device or "cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r}: no CUDA device is available here; use --device cpu")
        path, adapter = split_adapter_ref(name)
        if adapter is not None and model_path_problems(name):
            raise InputError(model_path_problems(name))
        _check_model_path(path)
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else \
            _load_tokenizer(str(tokenizer or path), str(tokenizer or path))
        hf_model = _load_from_path(path, _resolve_dtype(dtype, dev), trust_remote_code)
        if adapter is not None:
            fold_adapter(hf_model, path, adapter)
        hf_model = hf_model.to(dev)
    else:
        hf_model = model
        name = getattr(model, "name_or_path", "") or type(model).__name__
        if tokenizer is None:
            raise InputError("a live model needs its tokenizer: evaluate(model, tasks, tokenizer=...)")
        tok = _load_tokenizer(str(tokenizer), str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
        if device is not None:
            hf_model = hf_model.to(device)
        dev = next(hf_model.parameters()).device
    was_training = bool(getattr(hf_model, "training", False))
    hf_model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    parameters = inspect.signature(hf_model.forward).parameters
    return LoadedModel(model=hf_model, tokenizer=tok, name=name, device=dev,
                       max_length=max_length or context_length(hf_model, tok), prefix_ids=special_prefix(tok),
                       pad_id=pad if pad is not None else 0, was_training=was_training,
                       _keeps_logits="logits_to_keep" in parameters,
                       _cache_name="cache" if "cache" in parameters else "past_key_values")
