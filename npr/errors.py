"""Errors caused by user input: the CLI prints their message, without a traceback, and exits 2."""


class NprError(Exception):
    """Bad input (a model spec, a file, a flag); the message names it and says what to do."""
