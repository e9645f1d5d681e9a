"""Errors a user can hit and fix. Each message says what happened and what to do."""


class FreetalkError(Exception):
    """Base class for errors caused by inputs, models or settings the user controls."""


class VideoReadError(FreetalkError):
    """A video (or audio) file cannot be opened or decoded."""


class NoFaceError(FreetalkError):
    """No face was found where one is needed."""


class ModelFileError(FreetalkError):
    """A model file is missing or unusable."""
