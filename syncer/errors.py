"""The errors the CLI turns into one line and a documented exit status."""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_INTERNAL = 4


class SyncerError(Exception):
    """An error with a message fit to show a user as it is."""

    exit_code = EXIT_INTERNAL


class ConfigError(SyncerError):
    """Invalid settings or command-line usage: nothing was sent and the database was not touched."""

    exit_code = EXIT_USAGE


class DatabaseUnavailable(SyncerError):
    """The database cannot be reached, or its schema is not the one this version needs."""

    exit_code = EXIT_DATABASE
