#!/usr/bin/env python
"""``stackwise-export-hf`` from a checkout: the same command line, ``stackwise_ds.tools_cli.export_hf_main``.

    python tools/export_hf.py --help
"""

import sys

from stackwise_ds.tools_cli import export_hf_main

if __name__ == "__main__":
    sys.exit(export_hf_main())
