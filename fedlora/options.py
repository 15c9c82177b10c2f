"""Configuration fields with their help text, and the sections that check themselves.

A section is a dataclass of `option`s. Its `problems()` returns one line per bad
value, naming the key (`lora.rank: 0 must be >= 1`), so that the whole
configuration can report every problem at once (fedlora.config). Strategies
declare their own parameters the same way, in their own files.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A field with its default, its help (shown by `--help`) and, optionally, its allowed values."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """One table of the run configuration (`[lora]`, or `[strategy.fedprox]`)."""

    NAME: ClassVar[str] = ""  # the table's name in TOML and in error messages

    @classmethod
    def subtables(cls) -> dict[str, type["Section"]]:
        """The sub-tables this section holds (`[strategy.<name>]`), by name; kept in its `params` field."""
        return {}

    def problems(self) -> list[str]:
        """Every problem with this section's own values, one line each, naming the key."""
        return []


class Problems(list):
    """A list of problem lines with a `need(condition, message)` shorthand."""

    def need(self, condition: bool, message: str) -> None:
        if not condition:
            self.append(message)
