#!/usr/bin/env python
"""``stackwise-consolidate`` from a checkout: the same command line, ``stackwise_ds.tools_cli.consolidate_main``.

    python tools/consolidate.py --help
"""

import sys

from stackwise_ds.tools_cli import consolidate_main

if __name__ == "__main__":
    sys.exit(consolidate_main())
