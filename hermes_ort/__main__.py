import sys

from hermes_ort.cli.main import main

sys.exit(main())
