"""User-facing errors.

A :class:`SurgeonError` carries a one-line message that names the problem (what was wrong, with which input);
the CLI prints it as ``error: <message>`` and exits with status 2, without a traceback unless ``--debug``.
"""

from __future__ import annotations

__all__ = ["SurgeonError"]


class SurgeonError(Exception):
    """An error caused by the user's input or environment (bad path, corrupt file, no network, ...)."""

    def __init__(self, message: str):
        # Keep the message to one line: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))
