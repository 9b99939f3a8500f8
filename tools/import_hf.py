#!/usr/bin/env python
"""``stackwise-import-hf`` from a checkout: the same command line, ``stackwise_ds.tools_cli.import_hf_main``.

    python tools/import_hf.py --help
"""

import sys

from stackwise_ds.tools_cli import import_hf_main

if __name__ == "__main__":
    sys.exit(import_hf_main())
