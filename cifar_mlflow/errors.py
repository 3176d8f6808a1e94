"""Errors the user can fix. Each carries a one-line message naming the bad value and what is allowed;
the command-line layer prints it without a traceback and exits non-zero."""


class CifarMlflowError(Exception):
    """Base class: a problem with the user's input, data or environment, not a bug."""


class ConfigError(CifarMlflowError, ValueError):
    """A parameter outside its allowed values."""


class DataError(CifarMlflowError):
    """Missing, corrupt or undownloadable data; the message names the file or URL."""


class ModelError(CifarMlflowError):
    """A model that cannot be found or loaded safely."""
