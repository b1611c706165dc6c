"""Error types shared by the command-line tools.

``UsageError`` is the user's mistake (bad option, unknown name, impossible range): the CLI prints its
message and exits 2. Anything else escaping a command is an internal failure: exit 1 with a short message
(the traceback only with ``MEDQC_DEBUG=1``).
"""


class MedqcError(Exception):
    """A user-facing failure with a clear message (exit 1)."""


class UsageError(MedqcError):
    """Bad command-line input (exit 2)."""
