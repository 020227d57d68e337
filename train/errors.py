"""What makes a training run stop with one line for the user.

Library code raises these (a caller such as a benchmark or a notebook can catch them and go on); the
entry points (`python -m train`, `train.export`, `train.plot`) print `error: <message>` on stderr and exit
with status 1, as they always did. A bad configuration is train.config.ConfigError (exit status 2)."""
from __future__ import annotations


class TrainError(ValueError):
    """A run cannot go on; the message is one line."""


class DataError(TrainError):
    """The training data cannot be read, or does not fit the run (modalities, labels, damaged shards)."""


class CheckpointError(TrainError):
    """A checkpoint cannot be used: missing, damaged, unsafe, or made for another model or data."""


class RunError(TrainError):
    """The run itself cannot go on: no device, determinism refused, a non-finite loss."""


class RunFolderError(TrainError):
    """A run folder cannot be read: its metrics log is missing, empty or damaged."""
