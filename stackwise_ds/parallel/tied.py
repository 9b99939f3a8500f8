"""Integrity check of tied weights: every stage's copy must equal the owner's, bit for bit.

DeepSpeed keeps one copy of a tied weight (the embedding / LM head) on each stage that
uses it and keeps them equal by all-reducing their gradients; a copy that misses an
update silently desynchronises them. The trainer runs this check at every checkpoint.
"""

from __future__ import annotations

import torch


def tied_weight_max_abs_diff(pipe) -> float:
    """Largest |copy - owner's copy| over all tied weights, the same value on every rank."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    worst = torch.zeros(1, dtype=torch.float64)
    for key in sorted(pipe.tied_comms):
        comm = pipe.tied_comms[key]
        for attr in comm["weight_attr"]:
            weight = pipe._recursive_getattr(comm["module"], attr).detach()
            owner = weight.clone()
            dist.broadcast(owner, src=min(comm["ranks"]), group=comm["group"])
            worst = torch.maximum(worst, (weight.double() - owner.double()).abs().max().reshape(1).cpu())
    # The accelerator's device, not a parameter's: an int8 frozen layer's full-precision weights live in a CPU
    # memory map (precision.py), and NCCL cannot reduce a CPU tensor.
    worst = worst.to(get_accelerator().current_device_name())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())
