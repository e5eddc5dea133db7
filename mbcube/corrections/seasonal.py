"""Seasonal surface offset of a scene relative to February, by acquisition month (m).

The sign. Lin et al. (2017) "adopted a height change correction of -0.28, -0.21, -0.14, -0.07,
0, +0.07 and +0.14 m" for scenes of October to April (February 0, the SRTM month). Read as a
correction ADDED to dh, an October scene would get -0.28 m. The physics says otherwise: snow
accumulates on these glaciers from October to April, so an October surface lies BELOW the
February one, a March or April surface above it; the table's signs (negative before February,
positive after) are those of the surface's height relative to February, and an October dh
(October surface minus the February reference) is too low by 0.28 m, so +0.28 m is added. The
paper's wording and its numbers' signs agree only under this reading of the numbers as the
surface's seasonal height change; nothing else in the paper settles it. So:

- `corrections.seasonal_sign: surface_offset` (default): the table is the surface's height
  relative to February; it is REMOVED from dh (October +0.28 m);
- `corrections.seasonal_sign: correction`: the table is a correction added to dh as written
  (October -0.28 m), for studies that read the paper literally.

`mbcube.synth` simulates the surface's height with its own table (it imports nothing from here),
so a sign or table changed here cannot change the truth the tests compare with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from mbcube.corrections.errors import CorrectionsError

SeasonalSign = Literal["surface_offset", "correction"]


def seasonal_offset_m(
    month: int,
    table_m: Mapping[int, float],
    scene_id: str,
    sign: SeasonalSign = "surface_offset",
) -> float:
    """The offset (m) to remove from the scene's glacier pixels: the table's value for the
    month, or its negative with sign 'correction' (module doc); a month missing from the table
    is refused with the study.yaml key to set."""
    if month in table_m:
        value = float(table_m[month])
        return value if sign == "surface_offset" else -value
    raise CorrectionsError(
        f"scene {scene_id}: no seasonal offset for month {month} (the table has months "
        f"{sorted(table_m)}). Set corrections.seasonal_offset_m.{month} (m, relative to "
        "February) in study.yaml, or leave the scene out."
    )
