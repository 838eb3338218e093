"""The one user-error base class: every CLI prints such an error as one line and exits 2; anything else is a bug
and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a directory): fixable without reading our code."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used (one line naming the key and the source)."""


class TrainingError(UserError):
    """A training run that cannot start or go on: a bad option combination, a model or dataset that does not fit."""


class VocabError(UserError, ValueError):
    """Vocabulary adaptation: the message names the file (and line) or the flag at fault."""


class Stopped(Exception):
    """The run stopped on request (a signal, its launcher gone) at a step boundary, after saving a checkpoint when it
    has a save_dir: not an error. Every CLI exits with `exit_code` (EX_TEMPFAIL) and the message as one line."""

    exit_code = 75
