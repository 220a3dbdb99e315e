"""`python -m research.results`."""

import sys

from research.results.cli import main

sys.exit(main())
