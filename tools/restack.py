#!/usr/bin/env python
"""``stackwise-restack`` from a checkout: the same command line, ``stackwise_ds.tools_cli.restack_main``.

    python tools/restack.py --help
"""

import sys

from stackwise_ds.tools_cli import restack_main

if __name__ == "__main__":
    sys.exit(restack_main())
