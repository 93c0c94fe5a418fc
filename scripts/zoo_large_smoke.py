"""Run every stage of the ``large`` zoo with all step counts cut to 2, on any device.

A check that the large size's data, model shapes, LoRA targets and file layout
work, where there is no time (or no GPU) to train it in full. Prints the base's
parameter count, the task file sizes and the time of each stage.

    .venv/bin/python scripts/zoo_large_smoke.py [--device cpu] [--cache DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mergesmith.zoo.model as zoo_model
from mergesmith.zoo.build import build_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: a temporary one, deleted afterwards)")
    args = parser.parse_args()
    zoo_model.SIZES["large"] = replace(zoo_model.SIZES["large"], pretrain_steps=2, ft_steps=2,
                                       multitask_steps=2, lora_steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        zoo = build_zoo("large", 0, args.cache or Path(tmp), device=args.device, progress=False)
        print(f"built in {time.time() - start:.0f}s on {args.device}")
        print("base parameters:", zoo.manifest["training"]["base"]["parameters"])
        for split in ("validation", "test"):
            sizes = {s: sum(1 for _ in p.open()) for s, p in zoo.tasks[split]["mc"].items()}
            print(f"{split} items per skill:", sizes)
        print("seconds per stage:", zoo.manifest["build_seconds"])


if __name__ == "__main__":
    main()
