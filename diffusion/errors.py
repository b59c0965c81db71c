"""Errors a user can act on: the command line prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or set-up: the message says what is wrong and what to do."""
