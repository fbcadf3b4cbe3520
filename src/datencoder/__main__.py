"""``python -m datencoder ...``: the same as the ``datencoder`` command."""

import sys

from .recipes.cli import main

if __name__ == "__main__":
    sys.exit(main())
