"""User-facing errors: one line, exit status 2, no traceback.

A :class:`UserError` is something the user can fix (a flag, a file, a model
that does not match).  Its message names the flag or file and says the fix.
:func:`run_main` turns it into a single line on stderr and ``SystemExit(2)``
(a subclass may set another ``exit_status``, e.g. 3 for a dead or hung actor,
:mod:`slime.ray.faults`); any other exception keeps its traceback, because that
one is our bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in the user's input; the message is one self-contained line."""

    exit_status: int = EXIT_USER_ERROR  # a subclass may end the process with another status


EXIT_RESUMABLE = 3


class ResumableFailure(UserError):
    """Something the run depends on failed (an engine or actor died or hung), not the input:
    one line, exit status 3; ``train.py`` adds the newest checkpoint and the resume command."""

    exit_status = EXIT_RESUMABLE


def raise_collected(errors: Iterable[str]) -> None:
    """Raise one UserError carrying every collected message, if there are any."""
    errors = [e for e in errors if e]
    if errors:
        raise UserError("; ".join(errors) if len(errors) > 1 else errors[0])


def read_json_file(path: str | Path, *, missing: str, corrupt_fix: str = "") -> Any:
    """The JSON value in ``path``; a missing file raises ``UserError(missing)``, a garbled one a
    UserError naming the file and the parser's complaint, then ``corrupt_fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(missing) from None
    except OSError as exc:  # unreadable: permissions, an I/O error
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc}){corrupt_fix}") from None
    # ValueError: bad JSON or UTF-8, an integer over Python's 4300 digits; RecursionError: nesting
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not valid JSON ({' '.join(str(exc).split())}){corrupt_fix}") from None


def fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_main(main: Callable[[], T]) -> T:
    """Call ``main``; a UserError becomes one stderr line and its exit status (2 unless it says)."""
    try:
        return main()
    except UserError as exc:
        fail(" ".join(str(exc).split("\n")), exc.exit_status)
