"""Run mergekit (a test-only reference) on a recipe dict."""

from __future__ import annotations

import warnings
from pathlib import Path


def run_mergekit(recipe: dict, out: Path, seed: int | None = None,
                 lora_merge_cache: Path | None = None) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = MergeConfiguration.model_validate(recipe)
        run_merge(cfg, str(out), options=MergeOptions(random_seed=seed, quiet=True, copy_tokenizer=True,
                                                      write_model_card=False,
                                                      lora_merge_cache=str(lora_merge_cache) if lora_merge_cache else None))
    return out
