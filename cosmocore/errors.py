"""The base of every error a user can fix: its message says what went wrong and what to do.

Entry points (`cosmocore` and the flows' `python -m` mains) print such errors as one line and exit
with status 2 instead of a traceback."""


class CosmoCoreError(Exception):
    """A problem with the user's inputs or environment, not a bug in CosmoCore."""


class ModelUnavailable(CosmoCoreError, RuntimeError):
    """The configured policy cannot be found or read."""


class DiskFull(CosmoCoreError, OSError):
    """A file could not be written for lack of disk space; what was there before is left as it was."""
