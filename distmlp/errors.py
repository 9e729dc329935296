"""The one exception family the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Something the user can fix (a path, a key, a value); str(e) is one line naming it."""
