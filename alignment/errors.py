"""User-facing errors: one line naming the file/field and the fix; the CLI prints it and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong data). Printed as ``error: ...``."""


class ConfigError(UserError):
    """Every problem found in a config at once, each as ``<dotted.path>: <what is wrong and what to do>``."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        n = len(problems)
        if n == 1:  # one line: `file: field: what is wrong and what to do`
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {n} problems\n" + "\n".join(f"  - {p}" for p in problems))
