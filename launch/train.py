#!/usr/bin/env python
"""Train a Rack on a DeepSpeed pipeline.

    deepspeed --num_gpus 2 launch/train.py --config launch/stackwise.yaml --set training.max_steps=100
    python launch/train.py                 # world size 1, the embedded default

See README.md for the config reference.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.training.run import exit_main  # noqa: E402

if __name__ == "__main__":
    exit_main()
