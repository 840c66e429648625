"""``python -m vectordb``: the command line (see :mod:`vectordb.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
