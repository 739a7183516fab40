"""User-facing errors.

Every error a user can cause (a bad flag, a broken file, a token outside the vocabulary) is raised
as a :class:`Step3Error` whose message is one line naming the culprit. The CLI prints it without a
traceback and exits non-zero; library callers can catch it like any exception.
"""


class Step3Error(Exception):
    """An error caused by the user's input, with a one-line message naming the culprit."""


class ConfigError(Step3Error):
    """A model configuration (``config.json`` or a preset) is missing, malformed or unsupported."""


class CheckpointError(Step3Error):
    """A checkpoint directory or one of its tensors is missing, malformed or unsupported."""
