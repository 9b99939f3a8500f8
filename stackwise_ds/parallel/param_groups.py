"""How the engine evens out optimizer param groups across train stages: pure arithmetic, no DeepSpeed import,
so the offline tools (``checkpoint/resharding.py``) split groups as the engine does without loading the engine."""

from __future__ import annotations


def equal_group_splits(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """How to split param groups of ``sizes`` parameters into ``target`` groups: ``(group, keep)``
    steps, each keeping the first ``keep`` parameters of ``group`` and moving the rest to a new last
    group with the same hyper-parameters (the same update).

    Why: ZeRO runs one gradient-norm all-reduce per param group, over the whole pipeline, so every
    train stage needs the same group count; per-stack learning rates give stages different counts.
    Always the largest group (the first of equals) is halved. Stops early when nothing can split."""
    sizes, splits = list(sizes), []
    while sizes and len(sizes) < target:
        group = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[group] < 2:
            break
        keep = sizes[group] // 2
        splits.append((group, keep))
        sizes.append(sizes[group] - keep)
        sizes[group] = keep
    return splits
