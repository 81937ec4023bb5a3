"""The exception family of loraclf.

Every error a user can cause is a :class:`LoraclfError` that carries *what* went wrong,
*where* (file, row, field or config key) and *how to fix it*. The library raises them;
only the CLI turns them into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


def brief(e: BaseException, limit: int | None = None) -> str:
    """The first line of a library's exception message (at most ``limit`` characters), or its
    type name when the message is empty: what goes in parentheses in a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def first_few(names: list[str], n: int = 3) -> str:
    """``names`` for a one-line message: the first ``n``, then how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


class LoraclfError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        # One line, always: newlines inside user data must not split the message.
        return " — ".join(p.replace("\n", " ") for p in parts)


class ConfigError(LoraclfError):
    """The configuration is invalid; ``problems`` lists every problem found at once."""

    def __init__(self, problems: list[str], where: str | None = None, fix: str | None = None):
        self.problems = problems
        super().__init__("; ".join(problems), where, fix)


class DataError(LoraclfError):
    """A data file, dataset or row cannot be used."""


class ModelError(LoraclfError):
    """The model cannot be loaded or does not fit the configuration."""


class BudgetError(LoraclfError):
    """The configuration trains more parameters than its budget allows."""


class RunError(LoraclfError):
    """A run directory is missing, incomplete or corrupted."""


class TrainingError(LoraclfError):
    """Training had to stop (e.g. a non-finite loss)."""
