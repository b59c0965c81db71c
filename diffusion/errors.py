"""Errors a user can act on: the command line prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or set-up: the message says what is wrong and what to do."""


def one_line(error: BaseException) -> str:
    """`ErrorType: message` on one line, for a foreign error quoted inside a UserError: the first line of its
    first argument (libraries such as webdataset append context as further arguments)."""
    lines = str(error.args[0]).strip().splitlines() if error.args else []
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
