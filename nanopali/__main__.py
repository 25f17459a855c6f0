"""`python -m nanopali`: the same as the `nanopali` command."""

import sys

from .cli import main

sys.exit(main())
