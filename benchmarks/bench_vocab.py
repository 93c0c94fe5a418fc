"""mergesmith vs mergekit on a ``tokenizer_source: union`` merge at the 1.1B TinyLlama shape.

Builds (or reuses) the random-weight checkpoints of ``bench_merge_1b.py`` with 8 extra
vocabulary rows, and gives the base and two experts tokenizers that share the ordinary
vocabulary and differ in their 8 added tokens (each expert added its own, at the same ids as
the base's own added tokens): the union holds 24 added tokens, every expert's rows move. The
same TIES recipe (density 0.5, the base and two experts) with ``tokenizer_source: union`` runs
through ``mergesmith merge`` and ``mergekit-yaml``, each in its own process under
``/usr/bin/time -v``; the script prints wall time, peak resident memory, the ratios and how far
apart the two outputs' vocabulary rows are, compared token by token (mergekit may number the
added tokens in another order: docs/vocab.md).

    .venv/bin/python benchmarks/bench_vocab.py                 # full size
    .venv/bin/python benchmarks/bench_vocab.py --layers 2      # a quick check of the script
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from bench_merge_1b import BIN, add_shape_arguments, build_checkpoints, timed
from mergesmith.checkpoint.reader import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import write_tokenizer  # noqa: E402

EXTRA = 8  # added tokens per model


def give_tokenizer(path: Path, vocab: int, prefix: str) -> None:
    """The shared word-level vocabulary of ``vocab`` tokens, then EXTRA added tokens of this model's own."""
    if (path / "tokenizer.json").exists() and f"<{prefix}0>" in (path / "tokenizer.json").read_text():
        return
    from transformers import AutoTokenizer

    write_tokenizer(path, vocab)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([f"<{prefix}{i}>" for i in range(EXTRA)])
    tok.save_pretrained(path)


def compare(ours: Path, theirs: Path) -> tuple[float, int, int, int, int]:
    """The largest difference between the two outputs' vocabulary rows, token by token; how many
    entries differ (of how many); how many tokens one output has that the other lacks; how many
    shared tokens the two number differently."""
    from transformers import AutoTokenizer

    vo = AutoTokenizer.from_pretrained(ours).get_vocab()
    vm = AutoTokenizer.from_pretrained(theirs).get_vocab()
    shared = sorted(set(vo) & set(vm))
    io, im = torch.tensor([vo[t] for t in shared]), torch.tensor([vm[t] for t in shared])
    a, b = Checkpoint.open(ours), Checkpoint.open(theirs)
    worst, differ, total = 0.0, 0, 0
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        x = a.read(name).index_select(0, io).float()
        y = b.read(name).index_select(0, im).float()
        worst = max(worst, (x - y).abs().max().item())
        differ, total = differ + int((x != y).sum()), total + x.numel()
    return worst, differ, total, len(set(vo) ^ set(vm)), int((io != im).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap)
    ap.add_argument("--dtype", default="float32", help="the recipe's dtype (math dtype for both tools)")
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()
    vocab = args.vocab
    args.vocab = vocab + EXTRA  # every model's rows: the shared tokens and its own added ones
    args.dtype_name, args.dtype = args.dtype, torch.bfloat16

    work = args.workdir / f"L{args.layers}-H{args.hidden}-I{args.intermediate}-V{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    base, fts = build_checkpoints(work, args)
    models = [base, fts[0], fts[1]]
    for path, prefix in zip(models, ("base", "a", "b")):
        give_tokenizer(path, vocab, prefix)
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in models[1:]],
              "parameters": {"normalize": True}, "dtype": args.dtype_name, "out_dtype": "bfloat16",
              "tokenizer_source": "union"}
    recipe_path = work / "ties-union.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    ours_out, theirs_out = work / "union-mergesmith", work / "union-mergekit"
    for d in (ours_out, theirs_out):
        shutil.rmtree(d, ignore_errors=True)
    ours = timed([str(BIN / "mergesmith"), "merge", str(recipe_path), str(ours_out), "--no-progress"],
                 work / "union-mergesmith.log")
    print(f"mergesmith:  {ours[0]:7.1f} s   peak RSS {ours[1]:5.2f} GiB", flush=True)
    params = sum(i.numel for i in Checkpoint.open(ours_out).infos.values())
    print(f"\nTIES, density 0.5, base + 2 experts, tokenizer_source union ({vocab} shared tokens, {EXTRA} added "
          f"per model), {params / 1e9:.2f}B output parameters, bf16 in/out, {args.dtype_name} math, "
          f"{os.cpu_count()} cores")
    if args.skip_mergekit:
        return
    theirs = timed([str(BIN / "mergekit-yaml"), str(recipe_path), str(theirs_out), "-j", str(os.cpu_count() or 1)],
                   work / "union-mergekit.log")
    print(f"mergekit:    {theirs[0]:7.1f} s   peak RSS {theirs[1]:5.2f} GiB", flush=True)
    print(f"speed-up: {theirs[0] / ours[0]:.1f}x   memory: {theirs[1] / ours[1]:.1f}x less")
    worst, differ, total, only_one, renumbered = compare(ours_out, theirs_out)
    # TIES on bf16 inputs: mergekit breaks ties between equal magnitudes at the trim threshold with an
    # unstable argsort, so about 1.7% of entries differ on any tensor (bench_merge_1b.py, docs/results.md).
    print(f"outputs: vocabulary rows, token by token: {differ} of {total} entries differ, by at most {worst:.2e}; "
          f"{only_one} tokens in one output only (0 expected); {renumbered} tokens numbered differently")


if __name__ == "__main__":
    main()
