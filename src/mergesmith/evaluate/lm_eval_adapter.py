"""Run a mergesmith model or task through lm-evaluation-harness, the reference we check against.

``lm-eval`` is a test-time dependency (``pip install lm-eval``); nothing else in
mergesmith imports it. The mapping of a mergesmith task onto an lm-eval task:

- ``doc_to_text``: the item's full context as mergesmith renders it without a chat
  template (description, few-shot examples, prompt), exported as the document's
  ``prompt`` field; lm-eval adds no few-shot examples of its own (``num_fewshot: 0``).
- ``target_delimiter``: the task's own, default ``""`` (mergesmith appends the
  choice to the prompt as written). lm-eval's default is ``" "``, so the config
  always sets it explicitly.
- ``doc_to_choice: choices``, ``doc_to_target: answer``; metrics ``acc`` and
  ``acc_norm``. lm-eval's ``acc_norm`` divides by the length in characters of the
  choice (delimiter excluded): mergesmith's ``acc_norm_chars``. lm-eval has no
  per-token normalization.
- Generation: ``generate_until`` with ``until`` = the task's stop sequences (lm-eval
  adds the EOS), ``max_gen_toks`` = ``max_new_tokens``, greedy; metric
  ``exact_match`` ignoring case and punctuation (mergesmith's exact match also drops
  articles, so only the generated texts are comparable one to one).
- Unlabelled items are left out: lm-eval needs a target for every document.
- Chat-template tasks run with ``apply_chat_template=True`` and the task's system
  prompt; lm-eval then drops the target delimiter, as mergesmith does only when it
  is ``""``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mergesmith.errors import InputError
from mergesmith.evaluate.prompts import plain_context
from mergesmith.evaluate.tasks import MULTIPLE_CHOICE, Task


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from None


def lm_eval_task_config(task: Task, data_dir: Union[str, Path]) -> dict[str, Any]:
    """Export ``task``'s labelled items to ``data_dir`` and return an lm-eval task config dict."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{task.name}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for item in task.items:
            if not item.labelled:
                continue
            doc: dict[str, Any] = {"id": item.id, "prompt": plain_context(task, item)}
            if task.type == MULTIPLE_CHOICE:
                doc.update(choices=list(item.choices), answer=item.answer)
            else:
                doc.update(reference=item.references[0], references=list(item.references))
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    config: dict[str, Any] = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "target_delimiter": task.settings.target_delimiter,
        "num_fewshot": 0,
    }
    if task.type == MULTIPLE_CHOICE:
        config.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="answer",
                      metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                   {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    else:
        config.update(output_type="generate_until", doc_to_target="reference",
                      generation_kwargs={"until": list(task.settings.stop), "do_sample": False,
                                         "max_gen_toks": task.settings.max_new_tokens},
                      metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                    "ignore_case": True, "ignore_punctuation": True}])
    return config


def lm_eval_model(model: Any, tokenizer: Any = None, *, batch_size: int = 8, device: Optional[str] = None,
                  max_length: Optional[int] = None):
    """An lm-eval ``HFLM`` around a model folder or a live model (with its tokenizer)."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from mergesmith.evaluate.model import load_model

    lm = load_model(model, tokenizer, device=device, max_length=max_length)
    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=lm.max_length)


@dataclass
class LmEvalTaskRun:
    metrics: dict[str, float]
    items: list[dict[str, Any]] = field(default_factory=list)  # id, loglikelihoods / prediction, acc, acc_norm


def run_lm_eval(model: Any, tasks: Sequence[Task], *, tokenizer: Any = None, batch_size: int = 8,
                device: Optional[str] = None, max_length: Optional[int] = None,
                workdir: Optional[Union[str, Path]] = None, hflm: Any = None) -> dict[str, LmEvalTaskRun]:
    """Evaluate ``tasks`` with lm-eval's ``simple_evaluate``; per task, its metrics and per-item outputs."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    hflm = hflm or lm_eval_model(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mergesmith-lm-eval-")
        workdir = tmp.name
    try:
        runs: dict[str, LmEvalTaskRun] = {}
        for chat in sorted({t.settings.chat_template for t in tasks}):
            group = [t for t in tasks if t.settings.chat_template == chat]
            systems = {t.settings.system_prompt for t in group}
            for system in systems:
                subset = [t for t in group if t.settings.system_prompt == system]
                configs = [lm_eval_task_config(t, workdir) for t in subset]
                out = simple_evaluate(model=hflm, tasks=configs, task_manager=TaskManager(include_defaults=False),
                                      log_samples=True, bootstrap_iters=0, apply_chat_template=chat,
                                      system_instruction=system if chat else None, verbosity="ERROR")
                runs.update(_collect(out, subset))
        return runs
    finally:
        if tmp is not None:
            tmp.cleanup()


def _collect(out: dict, tasks: Sequence[Task]) -> dict[str, LmEvalTaskRun]:
    runs = {}
    for task in tasks:
        metrics = {k.split(",")[0]: v for k, v in out["results"][task.name].items()
                   if k.endswith(",none") and "stderr" not in k}
        items = []
        for sample in sorted(out["samples"][task.name], key=lambda s: s["doc_id"]):
            entry: dict[str, Any] = {"id": sample["doc"]["id"]}
            if task.type == MULTIPLE_CHOICE:
                entry["loglikelihoods"] = [float(r[0]) for r in sample["filtered_resps"]]
                entry.update(acc=sample["acc"], acc_norm=sample["acc_norm"])
            else:
                entry["prediction"] = sample["filtered_resps"][0]
                entry["exact_match"] = sample["exact_match"]
            items.append(entry)
        runs[task.name] = LmEvalTaskRun(metrics, items)
    return runs
