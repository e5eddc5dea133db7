"""Errors of the unwrapping step."""

from __future__ import annotations

from mbcube.errors import StudyError


class UnwrapInputError(StudyError):
    """Scene layers that cannot be unwrapped as given (phase outside [-pi, pi], coherence
    outside [0, 1], no height of ambiguity where there is phase). The message names the scene,
    the tile and the values."""


class TileUnwrapError(RuntimeError):
    """The engine (or the kernel around it) failed on one tile; the message names the scene and
    the tile (row, col) and the pixel window."""
