"""Errors a user can fix. The CLI turns them into exit code 2 and a readable list."""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad recipe, bad model folder, bad task file: every problem found, at once.

    Each problem is one line naming the file, the field and the fix, e.g.
    ``recipe.yml: models[1].parameters.density = 1.4 must be in (0, 1]``.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


def decode_utf8(data: bytes, where: object) -> str:
    """``data`` as text, or an InputError naming ``where`` and the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text (byte {err.start}: 0x{data[err.start]:02x}); "
                         "save the file as UTF-8") from None


def read_text(path: "str | os.PathLike[str]") -> str:
    """A user's text file (recipe, config, task file): UTF-8 or a clear InputError.

    A missing or unreadable file is an environment fault, left as OSError.
    """
    with open(path, "rb") as fh:
        return decode_utf8(fh.read(), path)


class ResourceError(Exception):
    """The machine, not the input, is at fault: a full disk, a read-only or forbidden path.

    The CLI turns it into exit code 1 and one line, no traceback (``--debug`` shows it).
    Whatever the run was writing has been removed, and the inputs are untouched.
    """
