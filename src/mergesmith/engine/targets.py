"""Where the stream puts merged tensors: one interface, several targets.

The executor (``stream.py``) opens a target, writes each merged tensor (or block of rows
of one) into it from its writer thread, and finishes it; it never asks which target it
feeds. ``CheckpointTarget`` writes a Hugging Face model folder: the pre-laid-out
safetensors shards (``checkpoint.writer``) and the side files, renamed into place only
when everything is written. ``ModelTarget`` copies into a live model instead (search's
resident model, ``checkpoint.memory``), so that a candidate costs the math and not a
write and a reload. A new output form (an adapter's ``lora_A``/``lora_B``, say) is a
new target.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Protocol

import torch

from mergesmith.checkpoint.memory import ModelWriter
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor
from mergesmith.engine.merge_plan import MergePlan
from mergesmith.engine.side_files import write_side_files
from mergesmith.errors import ResourceError
from mergesmith.units import human_bytes


class Target(Protocol):
    """What the stream feeds. A context manager: entering prepares it; leaving on an error or an
    interrupt cleans up what it can (a model folder leaves nothing behind)."""

    def __enter__(self) -> "Target": ...

    def __exit__(self, exc_type, exc, tb) -> None: ...

    def write(self, name: str, tensor: torch.Tensor, row: Optional[int] = None) -> None:
        """The merged tensor ``name`` whole, or (``row`` given) the block of its rows (first axis) that
        starts there; called from one writer thread, for distinct tensors and blocks."""

    def finish(self) -> None:
        """Every tensor is written: make the result whole and visible."""


class CheckpointTarget:
    """A model folder at ``out_dir``: sharded safetensors beside config, tokenizer and model card,
    written under a hidden name and renamed into place by ``finish`` (atomic)."""

    def __init__(self, plan: MergePlan, out_dir: Path, shard_bytes: int, overwrite: bool = False):
        self.plan = plan
        self.out_dir = out_dir
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        self.writer: CheckpointWriter | None = None

    def __enter__(self) -> "CheckpointTarget":
        specs = [OutputTensor(t.name, t.out_dtype, t.shape) for t in self.plan.tensors]
        writer = CheckpointWriter(self.out_dir, specs, self.shard_bytes, overwrite=self.overwrite)
        free = shutil.disk_usage(writer.tmp_dir.parent if writer.tmp_dir.parent.exists() else Path.cwd()).free
        if free < writer.total_bytes:
            raise ResourceError(f"{self.out_dir}: the merged model needs {human_bytes(writer.total_bytes)} of disk, "
                                f"only {human_bytes(free)} is free there; free some space or choose another output "
                                "path")
        writer.tmp_dir.parent.mkdir(parents=True, exist_ok=True)
        self.writer = writer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.writer is not None
        self.writer.__exit__(exc_type, exc, tb)

    def write(self, name: str, tensor: torch.Tensor, row: Optional[int] = None) -> None:
        assert self.writer is not None
        if row is None:
            self.writer.write(name, tensor)
        else:
            self.writer.write(name, tensor, row=row)

    def finish(self) -> None:
        assert self.writer is not None
        write_side_files(self.plan, self.writer)
        self.writer.commit()


class ModelTarget:
    """A live model (``checkpoint.memory.ModelWriter``): each tensor is copied into the parameter of its
    name, with the rounding of loading the written checkpoint; ``finish`` checks that every tensor
    was written, since one left from a previous merge would change the model silently. A merge
    stopped halfway leaves the model part old, part new: the next one writes every tensor again."""

    def __init__(self, writer: ModelWriter):
        self.writer = writer

    def __enter__(self) -> "ModelTarget":
        self.writer.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    def write(self, name: str, tensor: torch.Tensor, row: Optional[int] = None) -> None:
        self.writer.write(name, tensor, row=row)

    def finish(self) -> None:
        self.writer.finish()
