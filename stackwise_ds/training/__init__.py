"""Learning-rate schedules, the training loop and its outputs (phases: ``stackwise_ds.phases``)."""
