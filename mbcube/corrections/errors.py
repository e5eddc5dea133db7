"""Errors of the corrections step."""

from __future__ import annotations

from mbcube.errors import StudyError


class CorrectionsError(StudyError):
    """A scene or study the corrections cannot handle: the message names the scene and the fix."""
