"""``python -m threadlets``: the command line, as the ``threadlets`` script
(:mod:`threadlets.cli`)."""

import sys

from threadlets.cli import main

if __name__ == "__main__":
    sys.exit(main())
