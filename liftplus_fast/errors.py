"""The package's one exception type for bad user input.

:class:`UserInputError` marks an error in what the user gave (an option, a name, a path, an
environment variable), as opposed to a failure inside the package. The command line prints it
as one line and exits with status 2; everything else keeps its traceback. It subclasses
``ValueError``, so callers that catch ``ValueError`` keep working; :class:`MissingInputError`
(a missing file or folder the user named) is also a ``FileNotFoundError``.
"""


class UserInputError(ValueError):
    """Bad input from the user; the message names the input and what was expected."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


__all__ = ["MissingInputError", "UserInputError"]
