"""`python -m verse ...` is the `verse` command (what `torchrun -m verse train ...` runs on every rank)."""

import sys

from verse.cli import main

sys.exit(main())
