"""The training stage's own error."""


class TrainError(Exception):
    """A user-fixable problem, or a run that must stop (NaN loss); the message names it."""
