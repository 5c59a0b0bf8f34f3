"""Errors a user can fix: the CLI prints them in one line, without a traceback."""


class UserError(Exception):
    """Something about the input, settings or environment that the user must change."""
