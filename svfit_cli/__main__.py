"""`python -m svfit_cli` runs the `svfit` command (how supervised worker processes are started)."""

import sys

from svfit_cli import main

sys.exit(main())
