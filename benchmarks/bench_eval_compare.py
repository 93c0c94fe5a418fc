"""Evaluation as a user runs it: ``mergesmith evaluate`` against ``lm_eval run``, whole processes.

Everything is built locally (no hub) by ``bench_eval_throughput.py``'s builders: a byte-level BPE
tokenizer, a random-init Llama saved as a model folder, and two multiple-choice tasks, written
both as a mergesmith task file (.jsonl) and as an lm-eval task (its YAML config over the same
items, from ``mergesmith.evaluate.lm_eval_adapter.lm_eval_task_config``):

- ``short``: 500 short four-choice items (a one-sentence prompt, a few words per choice);
- ``competition``: 100 competition-shaped items (a passage of 10 sentences and a question, the
  choices given in the prompt as A-D and answered with their letter).

Each tool runs as its own process under ``/usr/bin/time -v`` (start-up, loading and scoring all
count), the two alternating within each repetition, and the script prints wall time, peak RSS
and the ratio of each repetition with their median and range.

    .venv/bin/python benchmarks/bench_eval_compare.py [--repeats 3] [--shapes short,competition]

Measure on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_eval_throughput import build_model, build_tokenizer, sentence, synthetic_corpus  # noqa: E402
from bench_merge_1b import BIN, timed  # noqa: E402

LETTERS = "ABCD"


def short_items(rng: random.Random, words: list[str], n: int) -> list[dict]:
    return [{"id": str(i), "prompt": sentence(rng, words, rng.randint(5, 9)) + " Answer:",
             "choices": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(4)],
             "answer": rng.randrange(4)} for i in range(n)]


def competition_items(rng: random.Random, words: list[str], n: int) -> list[dict]:
    items = []
    for i in range(n):
        passage = " ".join(sentence(rng, words, rng.randint(8, 14)) for _ in range(10))
        options = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(4)]
        listed = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, options))
        items.append({"id": str(i), "prompt": f"{passage}\nQuestion: which {rng.choice(words)}?\n{listed}\nAnswer:",
                      "choices": list(LETTERS), "answer": rng.randrange(4)})
    return items


def write_task(name: str, items: list[dict], work: Path) -> tuple[Path, Path]:
    """The items as a mergesmith .jsonl and as an lm-eval include folder holding the same task."""
    from mergesmith.evaluate.lm_eval_adapter import lm_eval_task_config
    from mergesmith.evaluate.tasks import Item, Task, TaskSettings

    ours = work / f"{name}.jsonl"
    ours.write_text("".join(json.dumps({"type": "multiple_choice", **item}) + "\n" for item in items))
    task = Task(name, "multiple_choice",
                [Item(id=it["id"], type="multiple_choice", prompt=it["prompt"], choices=tuple(it["choices"]),
                      answer=it["answer"], position=n) for n, it in enumerate(items)],
                TaskSettings(target_delimiter=" "), source="synthetic")
    include = work / f"lm-eval-{name}"
    include.mkdir(exist_ok=True)
    (include / f"{name}.yaml").write_text(yaml.safe_dump(lm_eval_task_config(task, include)))
    return ours, include


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="short,competition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="items per batch for mergesmith; lm-eval gets "
                                                             "four times as many requests (one per choice)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergesmith-bench-eval")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = synthetic_corpus(rng)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer(words, rng, 8192)
        build_model(tokenizer, args.hidden, args.layers, 0).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    builders = {"short": (short_items, 500), "competition": (competition_items, 100)}
    for shape in args.shapes.split(","):
        build, n = builders[shape]
        ours_file, include = write_task(f"bench_{shape}", build(random.Random(1), words, n), work)
        ours_cmd = [str(BIN / "mergesmith"), "evaluate", str(model_dir), "--tasks", str(ours_file),
                    "--out", str(work / f"ours-{shape}"), "--batch-size", str(args.batch_size), "--no-progress"]
        theirs_cmd = [str(BIN / "lm_eval"), "run", "--model", "hf", "--model_args",
                      f"pretrained={model_dir},dtype=float32", "--tasks", f"bench_{shape}",
                      "--include_path", str(include), "--batch_size", str(4 * args.batch_size),
                      "--device", "cpu", "--output_path", str(work / f"lm-eval-out-{shape}")]
        print(f"\n{shape}: {n} four-choice items, model {args.hidden} wide, {args.layers} layers", flush=True)
        runs: dict[str, list[tuple[float, float]]] = {"mergesmith": [], "lm-eval": []}
        for r in range(args.repeats):
            order = [("mergesmith", ours_cmd), ("lm-eval", theirs_cmd)]
            for name, cmd in (order if r % 2 == 0 else order[::-1]):
                runs[name].append(timed(cmd, work / f"{shape}-{name}-{r}.log"))
                print(f"  repeat {r + 1}: {name:10s} {runs[name][-1][0]:6.1f} s  {runs[name][-1][1]:5.2f} GiB",
                      flush=True)
        ratios = [t[0] / o[0] for o, t in zip(runs["mergesmith"], runs["lm-eval"])]
        accuracy = json.loads((work / f"ours-{shape}" / "results.json").read_text())
        print(f"  mergesmith median {statistics.median(w for w, _ in runs['mergesmith']):6.1f} s, lm-eval median "
              f"{statistics.median(w for w, _ in runs['lm-eval']):6.1f} s: mergesmith {statistics.median(ratios):.2f}x "
              f"faster [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"  (mergesmith's results.json: {json.dumps(accuracy.get('tasks', accuracy))[:160]})")


if __name__ == "__main__":
    main()
