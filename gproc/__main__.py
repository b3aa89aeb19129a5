"""``python -m gproc``: the same as the ``gproc`` command."""

import sys

try:
    from gproc.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python was still loading gproc
    sys.exit(130)

sys.exit(main())
