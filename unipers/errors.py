"""The errors unipers reports as the user's to fix, and the exit codes of its commands.

Every error a user can cause (a bad config key, a file that fails validation, an output folder unipers did
not create) is a ``UnipersError`` whose message is one line naming the file or key and the problem. The
``unipers`` command prints that line and exits ``EXIT_USAGE``; anything else is a failure (``EXIT_FAILED``),
also printed as one line. ``unipers --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""An unexpected failure (a bug, a crashed worker, an out-of-memory)."""
EXIT_USAGE = 2
"""A mistake in the input: config, flags, files. Fix the named key or file and run again."""
EXIT_STOPPED = 75
"""Stopped by a signal (SIGTERM) after writing a resumable checkpoint: rerun with ``ckpt_path=last``.
75 is EX_TEMPFAIL of sysexits.h, "try again later"; it is not 0, so ``&&`` and requeue scripts can tell a
stopped run from a finished one."""


class UnipersError(Exception):
    """A problem with the user's input; the message is one line naming the file or key."""


class StoppedBySignal(UnipersError):
    """A run stopped on SIGTERM at the end of a step, after writing its checkpoint."""

    exit_code = EXIT_STOPPED


class DivergedError(UnipersError):
    """Training produced a non-finite loss or concept row; nothing non-finite was saved."""

    exit_code = EXIT_FAILED
