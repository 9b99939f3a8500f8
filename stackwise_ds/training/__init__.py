"""Phases, learning-rate schedules, the training loop and its outputs."""
