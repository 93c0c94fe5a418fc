"""Errors a user can fix. The CLI turns them into exit code 2 and a readable list."""

from __future__ import annotations


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
