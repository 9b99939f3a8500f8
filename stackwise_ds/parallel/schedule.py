"""Role-aware training schedule: 1F1B where gradients flow, forward streaming where they do not.

Stages ``0 .. f-1`` (``f`` = first train stage) are forward-only; stages ``f .. S-1`` are train or
relay stages and form a *backprop sub-pipeline*. The sub-pipeline runs DeepSpeed's own
``TrainSchedule`` with stage ids shifted by ``f`` (so its even/odd send-receive interleaving, which
is what makes 1F1B deadlock-free, is kept exactly), with three edits:

* stage ``f`` (if ``f > 0``) receives each micro-batch's activation from stage ``f-1`` right before
  the forward pass, and, being the sub-pipeline's first stage, never sends a gradient back;
* only the real first/last stages load micro-batches (stage 0 the inputs, stage S-1 the labels);
* relays and backprop stages (frozen layers the gradient passes through) skip the reduction/optimizer
  instructions (they hold no parameters to update).

Forward-only stages run ``[Load | Recv] -> Forward -> Send`` per micro-batch. Their only peers
downstream are consumers: stage ``f`` posts its receives in micro-batch order, and nothing it
waits on depends on the forward-only stages, so the blocking sends cannot form a cycle (same
argument for the chain of forward-only stages).

Every stage ends the batch with ``SyncTiedWeights``: tied copies whose owner trained this step
are broadcast from the owner (a collective within the tie group; a no-op where nothing is tied).
Stages without optimizer then ``CountStep`` where train stages ``OptimizerStep``.
"""

from __future__ import annotations

from deepspeed.runtime.pipe.schedule import (
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    TrainSchedule,
)

from .roles import BACKPROP, FORWARD_ONLY, RELAY, RolePlan

_MODEL_UPDATE = (ReduceTiedGrads, ReduceGrads, OptimizerStep)
_NO_OPTIMIZER = (RELAY, BACKPROP)  # stages of the backprop sub-pipeline that update nothing


class SyncTiedWeights(PipeInstruction):
    """Broadcast tied weights from the one copy that trained to the copies that did not."""


class CountStep(PipeInstruction):
    """End of batch on a stage without optimizer: count the step (``global_steps``/``global_samples``)
    as ``OptimizerStep`` does on train stages, so step-derived names and logs agree across stages."""


class StageWiseTrainSchedule(PipeSchedule):
    """``TrainSchedule`` for the backprop sub-pipeline, forward streaming before it."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int, plan: RolePlan):
        super().__init__(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
        if plan.num_stages != stages:
            raise ValueError(f"role plan has {plan.num_stages} stages, the pipeline {stages}")
        self.role = plan.stage_roles[stage_id]
        self.first_train_stage = plan.first_train_stage
        self.inner = None
        if self.role != FORWARD_ONLY:
            self.inner = TrainSchedule(micro_batches=micro_batches, stages=stages - self.first_train_stage,
                                       stage_id=stage_id - self.first_train_stage)

    def num_pipe_buffers(self) -> int:
        # a forward-only stage sends each output before it computes the next one
        return 2 if self.inner is None else self.inner.num_pipe_buffers()

    def steps(self):
        if self.inner is None:
            yield from self._forward_only_steps()
        else:
            for cmds in self.inner.steps():
                yield self._adapt(cmds)

    def _forward_only_steps(self):
        for micro_batch_id in range(self.micro_batches):
            buffer_id = micro_batch_id % self.num_pipe_buffers()
            cmds = [LoadMicroBatch(buffer_id) if self.is_first_stage else RecvActivation(buffer_id),
                    ForwardPass(buffer_id), SendActivation(buffer_id)]
            if micro_batch_id == self.micro_batches - 1:
                cmds += [SyncTiedWeights(), CountStep()]
            yield cmds

    def _adapt(self, cmds: list[PipeInstruction]) -> list[PipeInstruction]:
        adapted = []
        fed_by_forward_only = self.stage_id == self.first_train_stage and self.stage_id > 0
        for cmd in cmds:
            if isinstance(cmd, ForwardPass) and fed_by_forward_only:
                adapted.insert(0, RecvActivation(cmd.buffer_id))  # before any load of labels
            if isinstance(cmd, LoadMicroBatch) and not (self.is_first_stage or self.is_last_stage):
                continue
            if isinstance(cmd, _MODEL_UPDATE) and self.role in _NO_OPTIMIZER:
                continue
            adapted.append(cmd)
        if any(isinstance(cmd, OptimizerStep) for cmd in cmds):
            adapted.append(SyncTiedWeights())
            if self.role in _NO_OPTIMIZER:
                adapted.append(CountStep())
        return adapted
