"""The files a merged model carries beside its weights: config, tokenizer, model card, recipe."""

from __future__ import annotations

import json
from pathlib import Path

from mergesmith._version import __version__
from mergesmith.checkpoint.writer import CheckpointWriter
from mergesmith.engine.merge_plan import MergePlan
from mergesmith.engine.models import ModelInfo
from mergesmith.errors import InputError, read_text
from mergesmith.recipe import Recipe

from mergesmith.vocab.tokenizers import TOKENIZER_FILES, tokenizer_files


def write_side_files(plan: MergePlan, writer: CheckpointWriter) -> None:
    ref = plan.models[plan.reference]
    writer.write_file("config.json", json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    if (ref.path / "generation_config.json").is_file():
        writer.copy_file(ref.path / "generation_config.json")
    if plan.vocabulary is not None:  # the output's tokenizer: the source's files with the tokens added
        for name, content in tokenizer_files(plan.vocabulary.tokenizer).items():
            if isinstance(content, Path):
                writer.copy_file(content, name)
            else:
                writer.write_file(name, content)
    else:
        tok_dir = tokenizer_dir(plan.recipe, plan.models)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                writer.copy_file(tok_dir / name)
    if plan.recipe.chat_template:
        cfg_path = writer.tmp_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["chat_template"] = plan.recipe.chat_template
        writer.write_file("tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
    writer.write_file("mergesmith_recipe.yml", plan.recipe.to_yaml())
    writer.write_file("README.md", model_card(plan))


def tokenizer_dir(recipe: Recipe, models: list[ModelInfo]) -> Path:
    """The folder the output's tokenizer files come from: tokenizer_source, else the reference model
    (which ``union`` starts from)."""
    source = recipe.tokenizer_source
    if source in (None, "base", "union"):
        source = recipe.base_model or recipe.slices[0].sources[0].model
    return next(m.path for m in models if m.ref == source)


def tokenizer_config_problems(recipe: Recipe, models: list[ModelInfo]) -> list[str]:
    """A chat_template is written into tokenizer_config.json: check that file now, not after the merge."""
    if not recipe.chat_template:
        return []
    path = tokenizer_dir(recipe, models) / "tokenizer_config.json"
    if not path.is_file():
        return []
    try:
        config = json.loads(read_text(path))
    except InputError as err:
        return err.problems
    except json.JSONDecodeError as err:
        return [f"{path}: not valid JSON ({err}); chat_template cannot be added to it"]
    if not isinstance(config, dict):
        return [f"{path}: must hold a JSON object, not {type(config).__name__}; chat_template cannot be added to it"]
    return []


def model_card(plan: MergePlan) -> str:
    m = plan.recipe.method
    models = "\n".join(f"- `{mi.ref}`" + (" (base)" if i == plan.reference and plan.recipe.base_model else "")
                       for i, mi in enumerate(plan.models))
    return (f"---\nlibrary_name: transformers\ntags:\n- mergesmith\n- merge\n---\n"
            f"# {plan.recipe.raw.get('name') or 'Merged model'}\n\n"
            f"Merged with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} using the "
            f"**{m.name}** method" + (f" ({m.reference})" if m.reference else "") + ".\n\n"
            f"## Models\n\n{models}\n\n## Recipe\n\n```yaml\n{plan.recipe.to_yaml()}```\n")
