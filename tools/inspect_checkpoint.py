#!/usr/bin/env python
"""``stackwise-inspect`` from a checkout: the same command line, ``stackwise_ds.tools_cli.inspect_main``.

    python tools/inspect_checkpoint.py --help
"""

import sys

from stackwise_ds.tools_cli import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main())
