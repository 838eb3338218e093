"""One exception type for everything a user can get wrong (paths, flags, file contents).

The CLIs print these as a single `error: ...` line and exit with status 2; anything else is a bug and keeps its
traceback.
"""


class VocabError(ValueError):
    """A user-facing error: the message names the file (and line) or the flag at fault."""
