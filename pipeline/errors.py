"""User-facing errors: one clear line for the user, no traceback.

Library code raises :class:`UserError` (or a subclass) for mistakes a user can fix (bad params,
missing files, wrong checksums). Stage entry points print it as one line and exit with status 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A bad value or an unknown key in params.yaml."""


class DataError(UserError):
    """A missing, corrupt or malformed data source or prepared data set."""
