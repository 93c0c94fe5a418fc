"""LoRA in adapter space, whole processes side by side: wall time and peak RSS.

1. Extraction: ``mergesmith extract-lora`` against ``mergekit-extract-lora`` (mergekit 0.1.5) on
   the same fine-tune and base, same maximum rank. (Issue 24's target: >= 3x faster at <= 1/3 of
   mergekit's peak RSS, at the 1.1B shape.)
2. Adapter merging: ``mergesmith merge-lora`` against PEFT's ``add_weighted_adapter`` (in a script
   that loads the base, the adapters, merges and saves, as a user would) on the same three
   adapters: exact concatenation (``concat`` / ``cat``) and TIES truncated to rank r
   (``ties`` / ``ties_svd``).

The checkpoints are random-weight Llama-shaped models (``bench_merge_1b.build_checkpoints``: a
base and fine-tunes = base + noise, bfloat16), cached in --workdir. The adapters for part 2 are
extracted from the fine-tunes by mergesmith first.

    .venv/bin/python benchmarks/bench_lora.py                      # the TinyLlama-1.1B shape
    .venv/bin/python benchmarks/bench_lora.py --layers 2 --hidden 256 --intermediate 704 --vocab 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge_1b import build_checkpoints, llama_tensors, timed  # noqa: E402

BIN = Path(sys.executable).parent
MERGESMITH = [sys.executable, "-m", "mergesmith"]  # the mergesmith on PYTHONPATH, e.g. a worktree's src

TINYLLAMA = {"layers": 22, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 32, "kv_heads": 4}

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, out, kind, rank, *adapters = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
for i, adapter in enumerate(adapters[1:], 1):
    peft_model.load_adapter(adapter, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(adapters))]
options = {"density": 0.5, "svd_rank": int(rank)} if kind == "ties_svd" else {}
peft_model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=kind, **options)
for name in names:
    peft_model.delete_adapter(name)
peft_model.save_pretrained(out, selected_adapters=["merged"])
"""


def folded_difference(ours: Path, theirs: Path) -> float:
    """Largest relative difference between the two adapters' products B A over shared modules."""
    from safetensors.torch import load_file

    a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    worst = 0.0
    for name in a:
        if not name.endswith("lora_A.weight") or name not in b:
            continue
        bname = name.replace("lora_A", "lora_B")
        pa = a[bname].float() @ a[name].float()
        pb = b[bname].float() @ b[name].float()
        worst = max(worst, float((pa - pb).norm() / pb.norm().clamp_min(1e-30)))
    return worst


def extraction_errors(adapter: Path, base: Path, finetune: Path) -> list[float]:
    """||dW - B A||_F / ||dW||_F of every LoRA module of an extracted adapter (scale 1, as both
    tools write), dW = finetune - base in float32."""
    from safetensors.torch import load_file

    from mergesmith.checkpoint.reader import Checkpoint

    factors = load_file(adapter / "adapter_model.safetensors")
    before, after = Checkpoint.open(base), Checkpoint.open(finetune)
    errors = []
    for name in sorted(factors):
        if not name.endswith(".lora_A.weight"):
            continue
        weight = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = after.read(weight).float() - before.read(weight).float()
        product = factors[name.replace("lora_A", "lora_B")].float() @ factors[name].float()
        errors.append(float((delta - product).norm() / delta.norm()))
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergesmith-bench-lora")
    for name, default in TINYLLAMA.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()

    work = args.workdir / f"L{args.layers}-H{args.hidden}-I{args.intermediate}-V{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    base, fts = build_checkpoints(work, args)
    params = sum(torch.Size(s).numel() for _, s in llama_tensors(args.hidden, args.intermediate, args.layers,
                                                                  args.vocab, args.heads, args.kv_heads))
    threads = os.cpu_count() or 1
    print(f"{params / 1e9:.2f}B parameters, bf16 checkpoints, rank {args.rank}, {threads} cores\n", flush=True)

    # 1. extraction
    ours_out, theirs_out = work / "extract-mergesmith", work / "extract-mergekit"
    for d in (ours_out, theirs_out):
        shutil.rmtree(d, ignore_errors=True)
    ours = timed([*MERGESMITH, "extract-lora", str(ours_out), "--model", str(fts[0]), "--base-model",
                  str(base), "--max-rank", str(args.rank), "--no-progress"], work / "extract-mergesmith.log")
    print(f"extract  mergesmith:  {ours[0]:7.1f} s   peak RSS {ours[1]:5.2f} GiB", flush=True)
    if not args.skip_mergekit:
        theirs = timed([str(BIN / "mergekit-extract-lora"), "--model", str(fts[0]), "--base-model", str(base),
                        "--out-path", str(theirs_out), "--max-rank", str(args.rank)], work / "extract-mergekit.log")
        print(f"extract  mergekit:    {theirs[0]:7.1f} s   peak RSS {theirs[1]:5.2f} GiB", flush=True)
        print(f"extract  speed-up {theirs[0] / ours[0]:.1f}x, memory {theirs[1] / ours[1]:.1f}x less", flush=True)
        mine, its = extraction_errors(ours_out, base, fts[0]), extraction_errors(theirs_out, base, fts[0])
        print(f"extract  relative error ||dW - BA||/||dW|| over {len(mine)} modules: mergesmith mean "
              f"{sum(mine) / len(mine):.6f} max {max(mine):.6f}; mergekit (exact SVD) mean {sum(its) / len(its):.6f} "
              f"max {max(its):.6f}; worst excess {max(a - b for a, b in zip(mine, its)):.2e}\n", flush=True)

    # 2. adapter merging, on adapters extracted from the fine-tunes
    adapters = []
    for i, ft in enumerate(fts):
        adapter = work / f"adapter{i}"
        if not (adapter / "adapter_model.safetensors").exists():
            timed([*MERGESMITH, "extract-lora", str(adapter), "--model", str(ft), "--base-model",
                   str(base), "--max-rank", str(args.rank), "--skip-undecomposable", "-e", "embed_tokens|lm_head",
                   "--no-progress", "--overwrite"], work / f"adapter{i}.log")
        adapters.append(adapter)
    script = work / "peft_merge.py"
    script.write_text(PEFT_MERGE)
    for ours_method, peft_kind in (("concat", "cat"), ("ties", "ties_svd")):
        recipe = {"merge_method": ours_method, "models": [{"model": str(a)} for a in adapters]}
        if ours_method == "ties":
            recipe["parameters"] = {"density": 0.5, "rank": args.rank}
            for entry in recipe["models"]:
                entry["parameters"] = {"weight": 1.0}
        path = work / f"{ours_method}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        ours_out, peft_out = work / f"merge-{ours_method}", work / f"merge-peft-{peft_kind}"
        for d in (ours_out, peft_out):
            shutil.rmtree(d, ignore_errors=True)
        ours = timed([*MERGESMITH, "merge-lora", str(path), str(ours_out), "--no-progress"],
                     work / f"merge-{ours_method}.log")
        print(f"{ours_method:7s}  mergesmith:  {ours[0]:7.1f} s   peak RSS {ours[1]:5.2f} GiB", flush=True)
        if args.skip_peft:
            continue
        theirs = timed([sys.executable, str(script), str(base), str(peft_out), peft_kind, str(args.rank),
                        *map(str, adapters)], work / f"merge-peft-{peft_kind}.log")
        print(f"{peft_kind:7s}  PEFT:        {theirs[0]:7.1f} s   peak RSS {theirs[1]:5.2f} GiB", flush=True)
        difference = folded_difference(ours_out, peft_out / "merged")
        print(f"{ours_method:7s}  speed-up {theirs[0] / ours[0]:.1f}x, memory {theirs[1] / ours[1]:.1f}x less; "
              f"largest relative difference of B A: {difference:.1e}\n", flush=True)
    print(json.dumps({"shape": vars(args) | {"workdir": str(args.workdir)}, "parameters": params}, default=str))


if __name__ == "__main__":
    main()
