#!/usr/bin/env python
"""``stackwise-eval`` from a checkout: the same command line, ``stackwise_ds.tools_cli.eval_main``.

    python tools/eval.py --help
    deepspeed --num_gpus 2 tools/eval.py runs/stackwise --config data.yaml   # a share of the windows per rank
"""

import sys

from stackwise_ds.tools_cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
