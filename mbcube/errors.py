"""Errors and warnings that mbcube raises for users to read.

The command line prints the expected ones (StudyError, StoreError and their kinds, and the
file system's refusals: disk full, read-only, permission) as one line per problem with exit
code 2; `--debug` shows the traceback."""


class StudyError(ValueError):
    """Bad study input: the message names the file, the row or field, and the fix."""


class StoreError(RuntimeError):
    """A cube store that is missing, of another schema version, or inconsistent."""


class StoreLocked(StoreError):
    """Another process is writing the store (one writer per store at a time)."""


class StoreDamaged(StoreError):
    """Files a step recorded are missing or do not decode: the message names them and the
    command that repairs them."""


class MbcubeWarning(UserWarning):
    """Something the user should know; the tests turn these into errors."""


def is_damage(err: BaseException) -> bool:
    """A failure to read the store that means it is damaged: StoreDamaged, a chunk failing its
    checksum, a codec that cannot decode its bytes, a metadata document that does not parse."""
    import json

    text = str(err).lower()
    return (
        isinstance(err, StoreDamaged | json.JSONDecodeError)
        or (isinstance(err, ValueError) and "checksum" in text)
        or (isinstance(err, RuntimeError) and "decompression" in text)
    )
