"""``python -m atomictools`` runs the command line."""

import sys

from atomictools.cli.commands import main

sys.exit(main())
