"""The one exception type users see: bad input, reported on one line."""


class AutocompError(ValueError):
    """Bad user input (budget, device, path, space, model, file).

    The command line prints ``str(error)`` on one line and exits with code 2; the Python API lets it
    propagate. Raise it *before* writing anything, so that a refused run leaves nothing behind.
    """
