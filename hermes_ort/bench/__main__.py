"""`python -m hermes_ort.bench ...` is `hermes-ort bench ...`."""

import sys

from hermes_ort.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
