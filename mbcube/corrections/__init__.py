"""Corrections of dh: masks, co-registration (DEM scenes), stable-ground datum, ramp, C/X
penetration, seasonal offset and outliers; each a numpy function of a block, with the cube step
`correct_cube` on top."""

from mbcube.corrections.errors import CorrectionsError
from mbcube.corrections.step import correct_cube, penetration_table, read_table

__all__ = ["CorrectionsError", "correct_cube", "penetration_table", "read_table"]
