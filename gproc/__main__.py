"""``python -m gproc``: the same as the ``gproc`` command."""

import sys

from gproc.cli import main

sys.exit(main())
