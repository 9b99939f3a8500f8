"""The trainer's parts that need no processes: the run history a resume takes over, the train iterator."""

from __future__ import annotations

import json
import math

from stackwise_ds.training.loop import train_iterator
from stackwise_ds.training.metrics import RunHistory


def _saved_history(tmp_path, n_losses: int) -> None:
    (tmp_path / "results.json").write_text(json.dumps({
        "losses": [float(i) for i in range(n_losses)],
        "val_history": [[0, 5.0], [4, 4.0], [8, 3.0]],
        "phases": [{"name": "a", "end_global_step": 4}, {"name": "b", "end_global_step": 8}]}))


def test_a_resume_takes_over_the_history_up_to_its_checkpoint_only(tmp_path):
    _saved_history(tmp_path, n_losses=10)
    history = RunHistory(tmp_path)
    history.take_over(global_step=6)
    assert history.results["losses"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert history.results["val_history"] == [[0, 5.0], [4, 4.0]]
    assert [p["name"] for p in history.results["phases"]] == ["a"]
    assert history.val_loss_at(4) == 4.0 and math.isnan(history.val_loss_at(6))
    assert history.losses_since(4) == [4.0, 5.0]


def test_a_history_older_than_the_checkpoint_or_missing_is_not_continued(tmp_path):
    _saved_history(tmp_path, n_losses=3)  # fewer steps than the checkpoint's: written by an older version
    history = RunHistory(tmp_path)
    history.take_over(global_step=6)
    assert history.results["losses"] == [] and history.results["phases"] == []
    fresh = RunHistory(tmp_path / "elsewhere")
    fresh.take_over(global_step=6)
    assert fresh.results["losses"] == [] and fresh.results["output_dir"] == str(tmp_path / "elsewhere")


class _Positioned:
    def at_position(self, consumed_samples: int):
        return range(consumed_samples, consumed_samples + 3)


def test_the_train_iterator_starts_a_seekable_source_at_the_consumed_sample():
    assert list(train_iterator(_Positioned(), 7)) == [7, 8, 9]
    assert list(train_iterator([1, 2], 7)) == [1, 2]  # a plain dataloader is read as given


def test_gradient_norms_are_asked_for_on_the_steps_that_log_them_only():
    from stackwise_ds.config import TrainingConfig
    from stackwise_ds.training.loop import StepLoop

    def logging_steps(log_interval: int) -> list[int]:
        loop = StepLoop(training=TrainingConfig(log_interval=log_interval), seq_len=8, n_stacks=2, global_batch=4,
                        monitor=None, history=None, checkpoint_dir=None)
        return [step for step in range(1, 13) if loop._logs_stats(step)]

    assert logging_steps(5) == [5, 10] and logging_steps(1) == list(range(1, 13)) and logging_steps(0) == []


def test_the_trainers_parts_are_built_with_keyword_arguments():
    """Neighbouring ints (seq_len, n_stacks, global_batch; rank, world_size) cannot be swapped by position."""
    import inspect

    import pytest

    from stackwise_ds.training.feeds import DataFeeds
    from stackwise_ds.training.loop import StepLoop
    from stackwise_ds.training.phase_pipeline import PhasePipeline
    from stackwise_ds.training.trainer import PhaseRunner

    for part in (DataFeeds, StepLoop, PhasePipeline, PhaseRunner):
        parameters = list(inspect.signature(part).parameters.values())
        assert parameters and all(p.kind == p.KEYWORD_ONLY for p in parameters), part.__name__
    with pytest.raises(TypeError):
        StepLoop(None, 256, 4, 16, None, None, None)
