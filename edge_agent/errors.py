"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (a path, a config, a bundle): reported without a traceback, exit code 2."""

    exit_code = 2


class CheckFailed(UserError):
    """A self-check failed (e.g. ONNX and torch disagree): loud, exit code 1."""

    exit_code = 1
