"""The project's expected failures, and how command lines report them.

An `InputError` is caused by what a user gave: a missing or unfit file or folder, a setting
that cannot work. Its message names the file or setting and what is wrong. Command lines
catch it (`reported`) and print it as one line on stderr with a non-zero exit status, no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys


class InputError(ValueError):
    """A file, folder or setting the user gave cannot be used; the message says which and why."""


class ConfigError(InputError):
    """A configuration value that cannot work; the message names the key."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (multi-line listings joined by '; ')."""
    parts = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(parts) or type(error).__name__


@contextlib.contextmanager
def reported(prog: str, status: int = 2):
    """Turn an InputError inside the block into 'prog: error: message' on stderr and exit
    with `status`."""
    try:
        yield
    except InputError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(status) from None
