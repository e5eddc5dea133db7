"""Synthetic scenes: what a bistatic InSAR pass or a DEM of the world looks like on a date."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mbcube.synth.noise import normal, value_noise
from mbcube.synth.world import SURFACE_CLEAN, SURFACE_OFF, WorldFields


@dataclass(frozen=True)
class SceneDef:
    """Everything that makes one synthetic scene, including its hidden errors (written to truth/)."""

    scene_id: str
    date: dt.date
    kind: Literal["insar", "dem"]
    seed: int
    h_amb_m: float
    h_amb_varies: bool  # write h_amb as a raster varying across range (+-5 %)
    nlooks: float
    looks_east: bool  # range direction: True = the sensor sits west of the scene
    incidence_deg: float
    swath_angle_rad: float
    swath_offset_m: float  # of the swath centre line from the grid centre
    swath_half_width_m: float
    datum_m: float
    ramp_m_per_km: tuple[
        float, float, float
    ]  # b, c, d of b x + c y + d x y (x, y in km from the centre)
    seasonal_deviation_m: float  # the true seasonal offset minus the table's value
    noise_m: float  # measurement noise (m, 1 sigma) of DEM-kind scenes
    crs: str | None = None  # None: written on the study grid

    @property
    def month(self) -> int:
        return self.date.month

    def seasonal_offset_m(self) -> float:
        """The glacier surface's true height relative to February (m) on the scene's date."""
        return snow_surface_m(self.month) + self.seasonal_deviation_m


#: The synthetic world's snow: the glacier surface rises by this much per month from October
#: to April (m), February being the reference DEM's month. The generator's own truth, written
#: here and never imported from the pipeline's configuration (`mbcube.corrections.seasonal`).
SNOW_RISE_M_PER_MONTH = 0.07


def snow_surface_m(month: int) -> float:
    """Height of the snow surface relative to February in the synthetic world (m): lower before
    February, higher after (0 outside October-April)."""
    if month not in (10, 11, 12, 1, 2, 3, 4):
        return 0.0
    return SNOW_RISE_M_PER_MONTH * _months_from_february(month)


def years_between(start: dt.date, end: dt.date) -> float:
    """Time span in years (days / 365.25)."""
    return (end - start).days / 365.25


def in_footprint(
    scene: SceneDef, x: np.ndarray, y: np.ndarray, centre: tuple[float, float]
) -> np.ndarray:
    dx, dy = x - centre[0], y - centre[1]
    across = -dx * np.sin(scene.swath_angle_rad) + dy * np.cos(scene.swath_angle_rad)
    return np.abs(across - scene.swath_offset_m) <= scene.swath_half_width_m


def radar_mask(scene: SceneDef, dz_dx: np.ndarray) -> np.ndarray:
    """Layover / foreshortening and shadow from the terrain slope along range (uint8, 1 = masked)."""
    toward = dz_dx if scene.looks_east else -dz_dx  # slope rising away from the sensor faces it
    slope_deg = np.degrees(np.arctan(toward))
    layover = slope_deg > scene.incidence_deg - 5.0  # strong foreshortening included
    shadow = -slope_deg > 90.0 - scene.incidence_deg
    return (layover | shadow).astype(np.uint8)


def coherence(
    scene: SceneDef, f: WorldFields, x: np.ndarray, y: np.ndarray, masked: np.ndarray
) -> np.ndarray:
    """Interferometric coherence: high on rock, lower on clean ice and higher up, low where masked."""
    base = np.where(
        f.surface_type == SURFACE_OFF,
        0.88,
        np.where(
            f.surface_type == SURFACE_CLEAN, 0.78 - 0.00012 * (f.surface_2000_m - 4500.0), 0.8
        ),
    )
    gamma = base + 0.07 * value_noise(x, y, 400.0, scene.seed + 21)
    gamma = np.where(masked == 1, 0.15, gamma)
    return np.clip(gamma, 0.05, 0.97).astype(np.float32)


def measured_dh_m(
    scene: SceneDef,
    f: WorldFields,
    srtm_c_m: np.ndarray,
    years: float,
    x: np.ndarray,
    y: np.ndarray,
) -> np.ndarray:
    """What the scene's X-band surface minus the reference DEM is, before datum and ramp (m)."""
    on_glacier = f.glacier > 0
    surface = f.surface_2000_m + f.rate_m_yr * years - f.penetration_x_m
    surface = surface + np.where(on_glacier, scene.seasonal_offset_m(), 0.0)
    return surface - srtm_c_m


def orbit_error_m(
    scene: SceneDef, x: np.ndarray, y: np.ndarray, centre: tuple[float, float]
) -> np.ndarray:
    """Datum offset plus bilinear ramp (m)."""
    xk, yk = (x - centre[0]) / 1000.0, (y - centre[1]) / 1000.0
    b, c, d = scene.ramp_m_per_km
    return scene.datum_m + b * xk + c * yk + d * xk * yk


def wrapped_phase(
    scene: SceneDef,
    dh_total_m: np.ndarray,
    gamma: np.ndarray,
    h_amb_m: np.ndarray | float,
    ix: np.ndarray,
    iy: np.ndarray,
) -> np.ndarray:
    """Wrapped phase (rad) with coherence-dependent noise (Cramer-Rao sigma for nlooks looks)."""
    sigma = np.sqrt(1.0 - gamma**2) / (gamma * np.sqrt(2.0 * scene.nlooks))
    noise = np.clip(sigma, 0, np.pi) * normal(ix, iy, scene.seed + 31)
    phase = 2.0 * np.pi / h_amb_m * dh_total_m + noise
    return np.angle(np.exp(1j * phase)).astype(np.float32)


def h_amb_field(
    scene: SceneDef, x: np.ndarray, centre: tuple[float, float], half_span_m: float
) -> np.ndarray | float:
    """Height of ambiguity (m): constant, or varying +-5 % across range."""
    if not scene.h_amb_varies:
        return scene.h_amb_m
    return scene.h_amb_m * (1.0 + 0.05 * (x - centre[0]) / half_span_m)


def make_scenes(
    rng: np.random.Generator,
    n: int,
    kind: Literal["insar", "dem", "mixed"],
    span_m: float,
    seed: int,
    other_crs: str | None,
) -> list[SceneDef]:
    """n scenes on winter dates of 2011-2014 (months Oct-Apr), with overlapping swaths."""
    months = [10, 11, 12, 1, 2, 3, 4]
    scenes = []
    for i in range(n):
        month = months[i % len(months)] if i < len(months) else int(rng.choice(months))
        year = int(rng.integers(2011, 2014)) + (1 if month <= 4 else 0)
        date = dt.date(year, month, int(rng.integers(1, 28)))
        scene_kind: Literal["insar", "dem"] = (
            "dem" if kind == "dem" or (kind == "mixed" and i % 2) else "insar"
        )
        scenes.append(
            SceneDef(
                scene_id=f"S{i + 1:02d}_{date:%Y%m%d}",
                date=date,
                kind=scene_kind,
                seed=seed * 1000 + i,
                h_amb_m=float(rng.uniform(35.0, 70.0)),
                h_amb_varies=i == 1,
                nlooks=4.0,
                looks_east=bool(i % 2 == 0),
                incidence_deg=float(rng.uniform(36.0, 46.0)),
                swath_angle_rad=float(rng.uniform(-0.3, 0.3) + (np.pi / 2 if i % 3 == 2 else 0.0)),
                swath_offset_m=float(rng.uniform(-0.25, 0.25) * span_m),
                swath_half_width_m=float(rng.uniform(0.33, 0.45) * span_m),
                datum_m=float(rng.normal(0.0, 2.0)),
                ramp_m_per_km=(
                    float(rng.normal(0, 1.5 / (span_m / 1000))),
                    float(rng.normal(0, 1.5 / (span_m / 1000))),
                    float(rng.normal(0, 1.0 / (span_m / 1000) ** 2)),
                ),
                seasonal_deviation_m=float(
                    rng.normal(0.0, 0.03 * abs(_months_from_february(month)))
                ),
                noise_m=1.0,
                crs=other_crs if (other_crs is not None and i == n - 1) else None,
            )
        )
    return scenes


def _months_from_february(month: int) -> int:
    return (month - 2 + 6) % 12 - 6
