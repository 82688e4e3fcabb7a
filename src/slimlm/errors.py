"""One error type for everything a user can get wrong.

The CLI turns a SlimlmError into a single line on stderr and exit code 2; anything else is a bug.
"""


class SlimlmError(Exception):
    """Bad input or an impossible request, with a message meant for the user."""
