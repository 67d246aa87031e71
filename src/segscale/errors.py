"""User-facing errors (the CLI prints these as one line, without a traceback) and the preemption
signal that every layer, from the Trainer to the trackers and the workers, agrees on."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegscaleError(ValueError):
    """Bad input from the user: a file, a key or a value that is not what was expected."""


class ConfigError(SegscaleError):
    """A configuration file or override that does not validate."""


class DataError(SegscaleError):
    """Input data that cannot be read or is inconsistent."""


def one_line_warning(message: Warning | str, *args: object, **kwargs: object) -> str:
    """warnings' format for users: what and where, as the message says it; no source line."""
    return f"warning: {message}\n"


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; resume to continue


USER_ERROR_EXIT_CODE = 2  # bad input: the one line printed says what and where
DIVERGED_EXIT_CODE = 3  # the loss diverged: the checkpoints before it are kept
STOP_FILE = "STOP"  # in a run folder: `segscale stop` asks the run to stop ("graceful" or "now")


class Diverged(Exception):
    """Training stopped by the divergence guard: a NaN/inf loss, or a loss far above its running
    minimum for several steps. Workers exit with DIVERGED_EXIT_CODE; trackers record FAILED."""


class Preempted(Exception):
    """A run stopped on request (SIGTERM/SIGINT) after writing its checkpoint; `--resume` goes on.
    Workers exit with PREEMPTED_EXIT_CODE; trackers record the run as KILLED."""


def shown(value: object, limit: int = 200) -> str:
    """repr(value) for a one-line message, cut to `limit` characters (a YAML alias can expand
    a short file into millions of values)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    choices = list(choices)
    same = [c for c in choices if c.lower() == word.lower()]  # UNET, SGD: the case is all
    close = same or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_builtin(part: object) -> bool:
    """Whether a component (callback, tracker, ...) is segscale's own rather than a user's
    plug-in: what ours raises is a bug to show with its traceback, a plug-in's is named."""
    return type(part).__module__.startswith("segscale.")


def raised_in(what: str, error: BaseException) -> SegscaleError:
    """A user's plug-in raising while a run uses it, as one line: `what` (its config key and the
    hook or sample), the error, and the line of the user's code it came from (the innermost
    frame outside installed packages and segscale; else the innermost frame)."""
    import traceback
    from pathlib import Path

    ours = str(Path(__file__).parent)
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if "site-packages" not in f.filename and ours not in f.filename]
    frame = (own or frames or [None])[-1]
    at = f" ({frame.filename}:{frame.lineno})" if frame is not None else ""
    return SegscaleError(f"{what} raised {type(error).__name__}: {error}{at}")
