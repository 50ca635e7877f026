"""Every one-line refusal derives from `HpcwalkError`; `first_line` is the one way to cut a message
(a library's exception) to the line a refusal quotes.

A refusal's message names the problem and the fix. The command line catches `HpcwalkError` alone and
prints `error: MESSAGE`, exit 2, having written nothing (hpcwalk/cli/common.py). The subclasses say which
input was wrong; they also derive from the builtin a caller would expect (ValueError for bad values,
RuntimeError for a folder or a model that cannot be used), so code catching those still works.
"""

from __future__ import annotations


class HpcwalkError(Exception):
    """A refusal: bad input or an unusable folder, model or device; one line naming it and the fix."""


class JobError(HpcwalkError, ValueError):
    """A job file or override is invalid; the message names the field and the fix."""


class CompileError(HpcwalkError, ValueError):
    """A speed option is invalid or cannot run here; the message names the option and the fix."""


class StoreError(HpcwalkError, RuntimeError):
    """The output folder cannot be used; the message says why and what to do."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's message, its first line only (its type's name when it has none), cut to `limit` characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if limit is None else line[:limit]


def first_sentence(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's first line, cut to `limit` characters (for long library errors)."""
    return first_line(e).split(". ")[0][:limit]
