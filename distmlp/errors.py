"""The exception family the CLI turns into a one-line message: exit code 2 for a user's mistake,
3 for a run that started and then stopped (it can be resumed from its last checkpoint)."""


class UserError(Exception):
    """Something the user can fix (a path, a key, a value); str(e) is one line naming it."""


class RunStopped(UserError):
    """A run stopped part-way: workers lost beyond the failure budget, or training diverged."""
