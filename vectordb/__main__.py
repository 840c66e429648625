"""``python -m vectordb``: the command line (see :mod:`vectordb.cli`)."""

from .cli import main

main()
