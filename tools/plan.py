#!/usr/bin/env python
"""``stackwise-plan`` from a checkout: the same command line, ``stackwise_ds.tools_cli.plan_main``.

    python tools/plan.py --world-size 8 --config launch/stackwise.yaml
"""

import sys

from stackwise_ds.tools_cli import plan_main

if __name__ == "__main__":
    sys.exit(plan_main())
