"""The one exception type whose message the CLI prints as a single line (no traceback)."""


class CosmoesError(Exception):
    """A problem with the user's input or environment, stated in one line."""
