"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegscaleError(ValueError):
    """Bad input from the user: a file, a key or a value that is not what was expected."""


class ConfigError(SegscaleError):
    """A configuration file or override that does not validate."""


class DataError(SegscaleError):
    """Input data that cannot be read or is inconsistent."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
