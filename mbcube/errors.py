"""Errors and warnings that mbcube raises for users to read."""


class StudyError(ValueError):
    """Bad study input: the message names the file, the row or field, and the fix."""


class StoreError(RuntimeError):
    """A cube store that is missing, of another schema version, or inconsistent."""


class MbcubeWarning(UserWarning):
    """Something the user should know; the tests turn these into errors."""
