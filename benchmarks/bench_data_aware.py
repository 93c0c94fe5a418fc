"""Data-aware merging at scale: statistics per model, then the RegMean and Fisher merges.

Builds a random-weight Llama family in float32 (three experts; by default hidden 1024,
intermediate 2816, 14 layers, vocab 32000: about 243M parameters, 0.9 GiB each) with a
word-level tokenizer, and 64 calibration prompts of 128 tokens. Then, each step in its own
process under ``/usr/bin/time -v``:

- statistics per model: the Gram matrices (``calibrate_model(..., ["gram"])``) and the
  diagonal Fisher (``["fisher"]``), for each expert;
- the RegMean merge and the Fisher merge (``mergesmith merge``, statistics cached);
- the RegMean++ merge: ``mergesmith merge`` first with nothing cached, so that it collects its
  Grams (every model's block l on activations through the merged blocks below, all models in
  one pass, block by block) before it streams, then again with them cached.

It prints wall time, peak RSS and peak RSS over one model's float32 size (the issue's
target: under 2x).

    python benchmarks/bench_data_aware.py                       # full size (minutes)
    python benchmarks/bench_data_aware.py --layers 1 --hidden 128 --intermediate 352 --vocab 2000
    python benchmarks/bench_data_aware.py --methods regmean --memory 2GiB   # one row, a fixed accumulator budget
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def build(workdir: Path, args) -> tuple[list[Path], Path, float]:
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=512, tie_word_embeddings=False)
    experts = []
    for i in range(3):
        folder = workdir / f"expert{i}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(i)
            tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
            write_tokenizer(folder, args.vocab)
        experts.append(folder)
    size = sum(f.stat().st_size for f in experts[0].glob("*.safetensors")) / 2 ** 30
    data = workdir / "calibration.jsonl"
    rng = __import__("random").Random(0)
    data.write_text("".join(json.dumps({"id": f"c{n}", "type": "generation", "references": ["w3"],
                                        "prompt": " ".join(f"w{rng.randrange(3, args.vocab)}"
                                                           for _ in range(args.tokens))}) + "\n"
                            for n in range(args.samples)))
    return experts, data, size


def timed(command: list[str]) -> tuple[float, float]:
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2 ** 20
    return seconds, rss


def merge(recipe_path: Path, out: Path) -> tuple[float, float]:
    return timed([str(BIN / "mergesmith"), "merge", str(recipe_path), str(out), "--overwrite", "--no-progress"])


def recipe(method: str, experts: list[Path], data: Path, cache: Path, args) -> dict:
    calibration = {"files": [str(data)], "samples": args.samples, "max_length": args.tokens + 1,
                   "batch_size": args.batch_size, "cache_dir": str(cache)}
    if args.memory:
        calibration["memory"] = args.memory
    return {"merge_method": method, "models": [{"model": str(e)} for e in experts], "calibration": calibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory", default=None,
                        help="calibration.memory (default: the recipe's default, auto: a quarter of one model, at most 2 GiB)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--methods", default="regmean,fisher,regmean_plusplus",
                        help="comma-separated rows to measure, e.g. regmean alone with a smaller --memory "
                             "(default: regmean,fisher,regmean_plusplus)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"regmean", "fisher", "regmean_plusplus"})
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} unknown; choose from regmean, fisher, regmean_plusplus")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-aware-"))
    experts, data, size = build(workdir, args)
    print(f"three experts of {size:.2f} GiB (float32) under {workdir}; {args.samples} prompts of {args.tokens} tokens")
    rows = []
    for method, kind in (("regmean", "gram"), ("fisher", "fisher")):
        if method not in methods:
            continue
        cache = workdir / "cache"
        path = workdir / f"{method}.yml"
        path.write_text(yaml.safe_dump(recipe(method, experts, data, cache, args)))
        for i in range(len(experts)):
            script = textwrap.dedent(f"""
                from mergesmith.api import plan_merge
                plan = plan_merge({str(path)!r})
                entry = plan.stats.models[{i}]
                for m in plan.models:
                    m.checkpoint.close()
                from mergesmith.calibrate import calibrate_model
                calibrate_model(entry.path, entry.settings, [{kind!r}], entry.folders, progress=False)
            """)
            rows.append((f"{kind} statistics, expert {i}", *timed([sys.executable, "-c", script])))
        rows.append((f"{method} merge (statistics cached)", *merge(path, workdir / f"out-{method}")))
    # RegMean++'s statistics depend on the merged blocks below, so the merge collects them itself.
    if "regmean_plusplus" in methods:
        for cached in (workdir / "cache").glob("gram_plusplus-*"):  # from an earlier run of this script
            shutil.rmtree(cached)
        path = workdir / "regmean_plusplus.yml"
        path.write_text(yaml.safe_dump(recipe("regmean_plusplus", experts, data, workdir / "cache", args)))
        rows.append(("regmean_plusplus merge (collects its Grams)", *merge(path, workdir / "out-regmean_plusplus")))
        rows.append(("regmean_plusplus merge (statistics cached)", *merge(path, workdir / "out-regmean_plusplus")))
    print(f"{'step':44s} {'wall':>8s} {'peak RSS':>10s} {'RSS / model':>12s}")
    for name, seconds, rss in rows:
        print(f"{name:44s} {seconds:7.1f}s {rss:8.2f} GiB {rss / size:11.2f}x")


if __name__ == "__main__":
    main()
