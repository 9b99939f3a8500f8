"""Errors a user can act on; kept free of heavy imports so the launcher can name them early."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and phase."""
