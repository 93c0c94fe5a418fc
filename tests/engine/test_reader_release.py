"""Releasing a tensor's mapped pages: resident memory goes down, the data stays right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergesmith.checkpoint.reader import Checkpoint, _release_file_pages, file_mappings

SMAPS = Path("/proc/self/smaps")
pytestmark = pytest.mark.skipif(not SMAPS.exists(), reason="needs Linux /proc/self/smaps")


def mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path``."""
    target, total, inside = str(path.resolve()), 0, False
    for line in SMAPS.read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(1024, 1024, generator=gen) for i in range(4)}  # 4 MiB each


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_release_drops_resident_pages_and_keeps_the_data(fmt, tmp_path):
    want = tensors()
    if fmt == "bin":
        torch.save(want, tmp_path / "pytorch_model.bin")
        weights = tmp_path / "pytorch_model.bin"
    else:
        save_file(want, tmp_path / "model.safetensors")
        weights = tmp_path / "model.safetensors"
    ckpt = Checkpoint.open(tmp_path)
    for name in want:
        assert ckpt.read(name).sum().item() == pytest.approx(want[name].sum().item(), rel=1e-6)
    touched = mapped_rss_kib(weights)
    assert touched >= 15 * 1024, "reading four 4 MiB tensors makes them resident"
    for name in want:
        ckpt.release(name)
    assert mapped_rss_kib(weights) <= touched - 15 * 1024
    for name in want:  # the pages come back from the file
        assert torch.equal(ckpt.read(name), want[name])
    ckpt.close()


def test_memory_that_is_not_a_mapping_of_the_file_is_never_released(tmp_path):
    ordinary = torch.arange(4 * 1024 * 1024, dtype=torch.float32)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.bin")
    torch.load(tmp_path / "other.bin", mmap=True, weights_only=True)
    _release_file_pages(ordinary, file_mappings(tmp_path / "other.bin"))
    _release_file_pages(ordinary, [])
    assert torch.equal(ordinary, torch.arange(4 * 1024 * 1024, dtype=torch.float32))
