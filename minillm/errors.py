"""The error a user can fix: bad input (a config value, a data file, a model folder, an output folder).

`minillm <command>` prints its message as one line and exits with status 2; every other failure is a
runtime one (status 1) or a bug (a traceback).
"""


class InputError(ValueError):
    """Input that cannot be used; the message names the file, record, key or value and what to do."""
