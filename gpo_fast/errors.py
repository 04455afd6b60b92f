"""The one base class of errors that mean "the user can fix this": bad input, a missing file, a state.

Every such error is one sentence: what is wrong and what to do. The CLI catches `UserError` in one place
and prints the sentence (exit code 2, no traceback); anything else is a bug and keeps its traceback.
Each layer derives its own (ConfigError, PromptFileError, CheckpointError, ModelLoadError,
RewardEngineError, TrainingDiverged); `InputError` and `MissingFileError` are for the rest.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a fixable state; the message says what is wrong and what to do."""


class InputError(UserError, ValueError):
    """A value the user gave (a config value, a prompt, an argument) that cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (weights, an adapter, a run) that is not there."""
