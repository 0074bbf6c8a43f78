"""The two ways reading or writing a checkpoint fails, each with a one-line message for the user."""


class CheckpointError(RuntimeError):
    """A save failed, or a run cannot resume from what it was given."""


class ConvertError(ValueError):
    """A checkpoint cannot be read or converted; the CLI prints the message as one `error:` line."""
