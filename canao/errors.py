"""User-facing errors: one line that names the problem and what to do."""


class CanaoError(Exception):
    """A problem with the user's input (file, option, data), reported without a traceback."""
