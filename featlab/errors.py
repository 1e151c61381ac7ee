"""User-facing errors: one clear line at the CLI, never a traceback."""


class FeatlabError(Exception):
    """An error whose message is meant for the user as-is (the CLI prints it and exits 2)."""
