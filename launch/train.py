#!/usr/bin/env python
"""Train a Rack on a DeepSpeed pipeline.

    deepspeed --num_gpus 2 launch/train.py --config launch/stackwise.yaml --set training.max_steps=100
    python launch/train.py                 # world size 1, the embedded default

See README.md; every config key is in docs/config.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

if __name__ == "__main__":
    import os

    # First, before the heavy imports: a SIGTERM from the launcher (another rank failed) must not
    # kill this rank before it can report its own error.
    from stackwise_ds.parallel.watchdog import install_startup_sigterm_handler

    install_startup_sigterm_handler(int(os.environ.get("RANK", "0")))
    from stackwise_ds.training.run import exit_main

    exit_main()
