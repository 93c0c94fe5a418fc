"""Output paths that can never touch an input, and one run per output at a time.

Every command that writes (merge, compete, evaluate, calibrate, search, ...) checks
its output path against every path it reads *before any work*:

- ``output_problems(out, inputs)`` says why ``out`` may not be written: it is an
  input, contains one, or lies inside one (symlinks resolved on both sides), or its
  parent is a file. ``--overwrite`` never lifts these: overwriting an input would
  delete the very model being merged.
- ``OutputLock(out)`` holds an exclusive lock on ``.NAME.lock`` beside ``out`` for
  the whole run, so a second run on the same output fails at once with a clear
  message instead of after all its work.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from mergesmith.errors import InputError

PathLike = Union[str, Path]


def _real(path: PathLike) -> Path:
    """Absolute path with every symlink resolved (non-existing tails kept as written)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def output_problems(out: PathLike, inputs: Union[Mapping[str, PathLike], Iterable[PathLike]],
                    what: str = "output", *, file: bool = False) -> list[str]:
    """Why ``out`` must not be written, given the paths the run reads (empty: fine).

    ``inputs`` maps a label (as the user wrote it, e.g. the recipe's model reference)
    to a path, or is a plain list of paths. ``out`` is a folder, or with ``file`` a file,
    which may exist as one (whether to replace it is the caller's to say).
    """
    labelled = inputs.items() if isinstance(inputs, Mapping) else ((str(p), p) for p in inputs)
    target = _real(out)
    problems = []
    for label, path in labelled:
        if path is None:
            continue
        source = _real(path)
        where = f"{label}" + (f" ({source})" if str(source) != str(label) else "")
        if target == source:
            problems.append(f"{out}: the {what} path is the input {where}; writing there would destroy it; "
                            "choose another output path")
        elif _within(source, target):
            problems.append(f"{out}: the {what} path contains the input {where}; replacing it would delete "
                            "that input; choose another output path")
        elif _within(target, source):
            problems.append(f"{out}: the {what} path lies inside the input {where}; an input is never "
                            "written to; choose a path outside it")
    for parent in [*([] if file else [target]), *target.parents]:
        if parent.exists():
            if not parent.is_dir():
                problems.append(f"{out}: {parent} is a file, not a folder; choose another output path")
            break
    return problems


def check_output(out: PathLike, inputs: Union[Mapping[str, PathLike], Iterable[PathLike]],
                 what: str = "output") -> None:
    problems = output_problems(out, inputs, what)
    if problems:
        raise InputError(problems)


class OutputLock:
    """An exclusive, non-blocking lock on ``.NAME.lock`` beside ``out`` (POSIX ``flock``).

    The lock file stays after the run (removing it would race with a waiting run);
    it is tiny and hidden. The kernel drops the lock if the process dies, so a crash
    never leaves a stale lock behind.
    """

    def __init__(self, out: PathLike, wait: bool = False):
        target = _real(out)
        self.out = Path(out)
        self.path = target.parent / f".{target.name}.lock"
        self.wait = wait  # block until the other run is done (saying so) instead of failing
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_pid(self.path)
            by = f" (process {holder})" if holder else ""
            if not self.wait:
                os.close(fd)
                raise InputError(f"{self.out}: another mergesmith run is writing this output{by}; "
                                 "wait for it to finish or choose another output path") from None
            print(f"waiting for another mergesmith run{by} to finish writing {self.out} ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this one always does): for leftovers named by a PID."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
