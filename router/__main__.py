"""``python -m tandem.router --config FILE``: the same as ``tandem router``."""

import sys

from tandem.router.cli import main

raise SystemExit(main(sys.argv[1:]))
