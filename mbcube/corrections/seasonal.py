"""Seasonal surface offset of a scene relative to February, by acquisition month (m)."""

from __future__ import annotations

from collections.abc import Mapping

from mbcube.corrections.errors import CorrectionsError


def seasonal_offset_m(month: int, table_m: Mapping[int, float], scene_id: str) -> float:
    """The offset (m) to remove from the scene's glacier pixels; a month missing from the table
    is refused with the study.yaml key to set."""
    if month in table_m:
        return float(table_m[month])
    raise CorrectionsError(
        f"scene {scene_id}: no seasonal offset for month {month} (the table has months "
        f"{sorted(table_m)}). Set corrections.seasonal_offset_m.{month} (m, relative to "
        "February) in study.yaml, or leave the scene out."
    )
