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


SEED_MAX = 2**63 - 1  # seeds are int64 (NumPy, torch), non-negative: config, CLI and derived

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


def check_seeds(first: int, count: int, what: str) -> None:
    """Refuse `count` seeds first, first+1, ... (`what`: the option that asks for them, e.g.
    "--runs 5") that go past SEED_MAX, before the first run trains: the last would be refused
    once the others had."""
    if first + count - 1 > SEED_MAX:
        raise SegscaleError(
            f"{what}: seeds {first} to {first + count - 1} go past the largest seed, {SEED_MAX}; "
            "give a smaller seed"
        )


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


# pydantic's error types, as a user reads them (YAML's words: a whole number, true/false, a
# mapping); the bounds come from the error's ctx
_EXPECTED = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a section (key: value)",
    "model_attributes_type": "a section (key: value)",
    "path_type": "a path",
    "greater_than": "a value > {gt}",
    "greater_than_equal": "a value ≥ {ge}",
    "less_than": "a value < {lt}",
    "less_than_equal": "a value ≤ {le}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
}


def expected_by(error: dict) -> str:
    """'expected ...' for one of pydantic's errors (an item of ValidationError.errors()), in
    plain words rather than pydantic's ("Input should be a valid integer, unable to parse
    string as an integer" is 'expected a whole number'); an error type not known here keeps
    pydantic's message, its "Input should be" read as "expected"."""
    words = _EXPECTED.get(error.get("type", ""))
    if words is not None:
        try:
            return "expected " + words.format(**error.get("ctx", {}))
        except (KeyError, IndexError):  # a ctx without the bound: pydantic's own words
            pass
    msg = str(error.get("msg", "invalid value"))
    if msg.startswith("Input should be "):
        return "expected " + msg.removeprefix("Input should be ")
    return msg[:1].lower() + msg[1:]
