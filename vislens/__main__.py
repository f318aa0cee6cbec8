"""``python -m vislens`` is the ``vislens`` command."""

import sys

from vislens.cli import main

sys.exit(main())
