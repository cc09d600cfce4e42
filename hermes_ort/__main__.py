import sys

from hermes_ort.cli import main

sys.exit(main())
