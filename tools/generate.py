#!/usr/bin/env python
"""``stackwise-generate`` from a checkout: the same command line, ``stackwise_ds.tools_cli.generate_main``.

    python tools/generate.py --help
"""

import sys

from stackwise_ds.tools_cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
