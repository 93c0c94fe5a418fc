"""Errors a user can fix. The CLI turns them into exit code 2 and a readable list."""

from __future__ import annotations

import codecs
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


def decode_utf8(data: bytes, where: object, *, what: str = "", offset: int = 0, lines: bool = True,
                fix: str = "save the file as UTF-8") -> str:
    """``data`` as text, or an InputError naming ``where``, the first bad byte and its offset.

    ``offset`` is where ``data`` starts in the file (a safetensors header starts at
    byte 8), so the reported offset is the file's; ``lines`` adds the line number,
    for text files. ``what`` names the part of the file (``"the config "``).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        at = offset + err.start
        newline = b"\n"
        line = f" (line {data.count(newline, 0, err.start) + 1})" if lines else ""
        bad = data[err.start:err.start + min(4, err.end - err.start)].hex(" ")
        subject = f"{what}is " if what else ""
        raise InputError(f"{where}: {subject}not UTF-8 text: byte {at}{line} is 0x{bad}; {fix}") from None


def read_text(path: "str | os.PathLike[str]") -> str:
    """A user's text file (recipe, config, task file): UTF-8 (a byte order mark is dropped) or
    a clear InputError naming the file, the byte, its offset and line.

    Decoding happens before any parser sees the text, so a file saved as, say, Latin-1 is one
    clear error instead of a traceback from deep inside a parser. A missing or unreadable
    file is an environment fault, left as OSError.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    return decode_utf8(data[start:], path, offset=start)


def read_yaml_mapping(path: "str | os.PathLike[str]", missing: str, not_mapping: str) -> tuple[dict, str]:
    """A user's YAML file that must hold a mapping: (the mapping, its text), or an InputError naming
    the file: ``missing`` when there is no such file, the parser's first line when it is not YAML,
    ``not_mapping`` when it holds something else. Each caller then validates the mapping its way."""
    import yaml

    where = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{where}: {missing}")
    text = read_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: {not_mapping}")
    return raw, text


class ResourceError(Exception):
    """The machine, not the input, is at fault: a full disk, a read-only or forbidden path.

    The CLI turns it into exit code 1 and one line, no traceback (``--debug`` shows it).
    Whatever the run was writing has been removed, and the inputs are untouched.
    """
