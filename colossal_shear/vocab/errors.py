"""Vocabulary adaptation's user errors (a colossal_shear.errors.UserError: one line, exit 2)."""

from colossal_shear.errors import UserError


class VocabError(UserError, ValueError):
    """A user-facing error: the message names the file (and line) or the flag at fault."""
