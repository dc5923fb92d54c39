"""The project's exceptions: every user mistake surfaces as one of these.

Each message names the bad value, what was expected, and how to fix it.
"""


class MultisupError(Exception):
    """Base class of every error this library raises for a user mistake."""


class ConfigError(MultisupError, ValueError):
    """A bad option: unknown name, out-of-range value, inconsistent settings."""


class DataError(MultisupError, ValueError):
    """A data set that is missing, malformed, empty or does not fit the model."""


class CheckpointError(MultisupError, RuntimeError):
    """A checkpoint that is missing, corrupt, or belongs to another run."""


class NonFiniteLossError(MultisupError, FloatingPointError):
    """A task's loss became NaN or infinite during training."""

    def __init__(self, task: str, step: int, value: float, checkpoint: str | None):
        self.task, self.step, self.value = task, step, value
        where = (
            f"The last good checkpoint, {checkpoint}, is intact: resume from it with a lower "
            "learning rate or gradient clipping."
            if checkpoint
            else "No checkpoint had been written yet."
        )
        super().__init__(
            f"loss of task '{task}' is {value} at step {step}. {where} "
            "To skip such steps instead of stopping, use on_nonfinite='skip' (--on-nonfinite skip)."
        )


class SolverError(MultisupError, ValueError):
    """Input a numerical solver cannot use: a non-finite, non-square or non-symmetric matrix, and so on."""
