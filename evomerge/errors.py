"""evomerge's own exception type for user mistakes.

Anything raised as an :class:`EvomergeError` is a problem with the user's input (a file, a
key, a tensor) and is printed by the CLI as one line without a traceback. Every other
exception is a bug in evomerge and keeps its traceback.
"""


class EvomergeError(Exception):
    """A user-facing error: the message says what is wrong and where."""
