"""``python -m surgeon_cli``: the ``surgeon`` command."""

from .main import run

run()
