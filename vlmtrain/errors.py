"""The one exception type for mistakes in the user's input.

A ``UserError`` is a mistake the user can fix: a config value, a data path, a checkpoint. The
entry points (``vlmtrain.cli``) print it as one line, ``<prog>: error: <message>``, and exit with
code 2 (``VLMTRAIN_DEBUG=1`` shows the traceback instead). Every other exception is a bug and keeps
its traceback, torch's and Lightning's ``ValueError`` included.

The message names what to fix: the key (``data.datasets.docs.path``), the file and line, or the
checkpoint. Both types subclass the built-in exceptions code raised before them, so callers that
catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input: config value, data path, checkpoint. Printed as one line
    ``<prog>: error: <message>`` with exit code 2; everything else is a bug and keeps its traceback."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user named (a data file, a checkpoint, a run directory) does not exist."""
