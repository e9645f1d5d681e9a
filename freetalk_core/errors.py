"""Errors a user can hit and fix. Each message says what happened and what to do."""


class FreetalkError(Exception):
    """Base class for errors caused by inputs, models or settings the user controls."""


class VideoReadError(FreetalkError):
    """A video (or audio) file cannot be opened or decoded."""


class NoFaceError(FreetalkError):
    """No face was found where one is needed."""


class ModelFileError(FreetalkError):
    """A model file is missing or unusable."""


def one_line(exc: BaseException) -> str:
    """How a failure reads in the store and on the command line: a user-fixable error's own
    first line; any other error's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, FreetalkError) else text
