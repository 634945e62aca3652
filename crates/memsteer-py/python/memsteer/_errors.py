"""memsteer's exceptions: the native core raises these with the command line's messages."""


class MemsteerError(Exception):
    """Base of every error memsteer raises."""


class InputError(MemsteerError, ValueError):
    """Bad input: a panel, a file, an argument or a model that memsteer cannot use as given."""


class MissingFileError(MemsteerError, FileNotFoundError):
    """A file or directory memsteer needs does not exist."""
