#!/usr/bin/env python
"""``stackwise-reshard`` from a checkout: the same command line, ``stackwise_ds.tools_cli.reshard_main``.

    python tools/reshard.py --help
"""

import sys

from stackwise_ds.tools_cli import reshard_main

if __name__ == "__main__":
    sys.exit(reshard_main())
