"""`python -m ness`."""

import sys

from ness.cli import main

sys.exit(main())
