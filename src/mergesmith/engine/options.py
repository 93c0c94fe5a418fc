"""The merge options (what ``mergesmith merge``'s flags set) and what is wrong with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mergesmith.checks import pick_device
from mergesmith.errors import InputError


@dataclass
class MergeOptions:
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    out_shard_size: int = 5 * 10 ** 9  # bytes per output shard, as mergekit's default
    overwrite: bool = False
    vocab_mismatch: str = "resize"  # resize (with a warning) or error
    prefetch_bytes: int = 128 * 1024 ** 2  # how far the reader may run ahead (one tensor always may)
    # Inputs (in the compute dtype) above which a tensor is merged in row blocks of about this many
    # bytes, where the method allows it (MethodSpec.row_separable); 0 merges every tensor whole.
    chunk_bytes: int = 64 * 1024 ** 2
    progress: bool = True
    random_seed: Optional[int] = None  # overrides the recipe's random_seed
    # NaN/Inf in an input or output tensor stop the merge unless this carries them through (with a warning).
    allow_nonfinite: bool = False


def option_problems(options: MergeOptions) -> list[str]:
    """What is wrong with the merge options (the CLI flags), before any work."""
    problems = []
    try:
        pick_device(options.device)
    except InputError as err:
        problems += err.problems
    if options.vocab_mismatch not in ("resize", "error"):
        problems.append(f"vocab_mismatch = {options.vocab_mismatch!r} must be resize or error")
    if options.threads is not None and options.threads < 1:
        problems.append(f"--threads {options.threads} must be at least 1 (or left out for torch's default)")
    if options.out_shard_size < 1:
        problems.append(f"--out-shard-size {options.out_shard_size} must be at least one byte, e.g. 5GB")
    if options.prefetch_bytes < 0:
        problems.append(f"--prefetch {options.prefetch_bytes} must not be negative")
    if options.chunk_bytes < 0:
        problems.append(f"--chunk {options.chunk_bytes} must not be negative (0 merges every tensor whole)")
    return problems
