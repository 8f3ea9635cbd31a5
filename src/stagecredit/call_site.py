"""Warnings that name the line of the caller's code that led to them, not a line inside stagecredit."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# the standard library's context-manager plumbing between a ``with rec.stage(...)`` block and the package
_PLUMBING = {os.path.abspath(contextlib.__file__)}


def _inside(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE) or path in _PLUMBING


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the innermost frame outside the stagecredit package (and ``contextlib``).

    A fixed ``stacklevel`` names whichever stagecredit function happened to be
    a few calls up (the same warning is reached through ``attribute``,
    ``validate``, ``intervene`` and the CLI); this names the caller's own
    line, e.g. its ``sc.attribute(...)`` call or its ``rec.batch(...)``.
    Python 3.12's ``skip_file_prefixes`` does the same.
    """
    frame, depth = sys._getframe(1), 1
    while frame is not None and _inside(frame.f_code.co_filename):
        frame, depth = frame.f_back, depth + 1
    warnings.warn(message, category, stacklevel=depth + 1)
