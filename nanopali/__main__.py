"""`python -m nanopali`: the same as the `nanopali` command."""

import sys

from nanopali.cli import main

sys.exit(main())
