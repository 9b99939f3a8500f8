"""Checkpoint tools: consolidate, load, reshard, export/import Hugging Face Llama, inspect, generate.

The command-line wrappers live in ``tools/``; everything they do is a function here.
"""

from .consolidate import consolidate, load_rack, load_rack_state, read_consolidated, save_consolidated
from .locate import CheckpointRef, list_tags, resolve_checkpoint

__all__ = ["CheckpointRef", "consolidate", "list_tags", "load_rack", "load_rack_state", "read_consolidated",
           "resolve_checkpoint", "save_consolidated"]
