"""`python -m sd15 ...` runs the same command line as the `sd15` script."""

import sys

from .cli import main

sys.exit(main())
