"""Errors caused by the user's input: reported as one clear message, without a traceback."""


class NanovppoError(Exception):
    """Base of the errors that the command line reports as a plain message."""


class ConfigError(NanovppoError, ValueError):
    """A config value is malformed or inconsistent."""
