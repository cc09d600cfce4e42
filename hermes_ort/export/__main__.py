"""`python -m hermes_ort.export ...` is `hermes-ort export ...`."""

import sys

from hermes_ort.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
