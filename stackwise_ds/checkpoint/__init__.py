"""Checkpoint tools: consolidate, load, reshard, export/import Hugging Face Llama, inspect, generate, evaluate.

The command-line wrappers live in ``tools/``; everything they do is a function here::

    from stackwise_ds.checkpoint import consolidate, load_rack, reshard, export_hf, import_hf, describe, evaluate

Names resolve lazily (PEP 562), so ``import stackwise_ds.checkpoint.cli`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "consolidate": "consolidation", "load_rack": "consolidation", "load_rack_with_config": "consolidation",
    "load_rack_state": "consolidation", "read_consolidated": "consolidation", "save_consolidated": "consolidation",
    "CheckpointRef": "locate", "list_tags": "locate", "resolve_checkpoint": "locate",
    "reshard": "resharding", "export_hf": "hf", "import_hf": "hf", "check_llama_compatible": "hf",
    "ExportError": "hf", "describe": "summary", "generate_text": "generate", "GenerationError": "generate",
    "evaluate": "evaluation", "Evaluation": "evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stackwise_ds.checkpoint' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
