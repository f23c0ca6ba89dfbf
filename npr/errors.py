"""The error contract of every npr command.

User errors (a bad flag, file, config value, model spec or device) raise an ``NprError``
subclass whose message names the flag, or the ``file:line`` and field, and says what to do.
The CLI prints that one message, without a traceback, and exits with status 2. Anything else
is a bug and keeps its traceback (exit 1). Input is checked before any work or any write, so a
refused command leaves nothing behind.
"""


class NprError(Exception):
    """Bad input (a model spec, a file, a flag); the message names it and says what to do."""


class UsageError(NprError, ValueError):
    """A command-line value that cannot be used (an output path, an empty prompt); the message names the flag."""
