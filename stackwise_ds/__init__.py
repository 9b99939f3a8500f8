"""StackWise-DS: train a transformer Rack end to end, stack by stack or block by block on DeepSpeed pipelines."""

__version__ = "0.1.0"
