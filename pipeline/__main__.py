"""`python -m pipeline ...`: see pipeline.cli."""

import zlib  # noqa: F401 - paddle 2.6 breaks zlib unless zlib is imported before it
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
