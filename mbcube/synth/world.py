"""The synthetic world: glaciers in valleys, its true surface, change rate, penetration and voids.

Every field is a function of map coordinates (grid CRS, m), so tiles, other grids and other CRSs
are all evaluated the same way, with bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

from mbcube.synth.noise import fractal_noise, normal, value_noise

SURFACE_OFF, SURFACE_CLEAN, SURFACE_DEBRIS = 0, 1, 2
VALLEY_WALL_SLOPE = np.tan(np.radians(38.0))
HEADWALL_SLOPE = np.tan(np.radians(40.0))
#: Width of the glacier margin over which elevation change fades to zero (m).
MARGIN_TAPER_M = 300.0


@dataclass(frozen=True)
class Glacier:
    """One synthetic glacier: a tapered, slightly bent tongue flowing from head to terminus."""

    index: int  # 1..N, the value it takes in rasters
    head_x: float
    head_y: float
    angle_rad: float  # flow direction
    length_m: float
    width_m: float
    bend_m: float
    z_head_m: float
    z_term_m: float
    debris_from: (
        float  # fraction of the length below which (towards the terminus) ice is debris-covered
    )
    rate_mean_m_yr: float  # rate at the glacier's mid elevation
    rate_gradient_per_m: float  # d(rate)/dz (1/yr)
    surge: bool
    penetration_factor: float  # this glacier's penetration relative to the regional law
    #: elevation change fades to 0 over this width inside the outline (m); 0: it does not, and
    #: a tongue's change meets the stable ground as a step (real tongues: the unwrapping trap)
    margin_taper_m: float = MARGIN_TAPER_M

    @property
    def z_mid_m(self) -> float:
        return 0.5 * (self.z_head_m + self.z_term_m)

    def local_coords(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance along the flow from the head (m) and distance from the centre line (m)."""
        dx, dy = x - self.head_x, y - self.head_y
        c, s = np.cos(self.angle_rad), np.sin(self.angle_rad)
        along = dx * c + dy * s
        across = -dx * s + dy * c
        frac = np.clip(along / self.length_m, 0.0, 1.0)
        return along, np.abs(across - self.bend_m * np.sin(np.pi * frac))

    def half_width_m(self, along: np.ndarray) -> np.ndarray:
        frac = np.clip(along / self.length_m, 0.0, 1.0)
        return (
            0.5
            * self.width_m
            * (0.45 + 0.55 * np.sqrt(1.0 - frac))
            * (0.3 + 0.7 * np.sqrt(np.clip(frac * 12, 0, 1)))
        )

    def outline(self, n: int = 48) -> Polygon:
        along = np.linspace(0.0, self.length_m, n)
        c, s = np.cos(self.angle_rad), np.sin(self.angle_rad)
        cx = self.head_x + along * c - self.bend_m * np.sin(np.pi * along / self.length_m) * s
        cy = self.head_y + along * s + self.bend_m * np.sin(np.pi * along / self.length_m) * c
        half = self.half_width_m(along) * 0.999
        left = np.column_stack([cx - half * s, cy + half * c])
        right = np.column_stack([cx + half * s, cy - half * c])
        return Polygon(np.vstack([left, right[::-1]])).buffer(0)

    def axis_elevation_m(self, along: np.ndarray) -> np.ndarray:
        """Elevation of the valley axis (m): the glacier profile, a headwall above, a valley below."""
        frac = np.clip(along / self.length_m, 0.0, 1.0)
        z = self.z_head_m + (self.z_term_m - self.z_head_m) * frac**0.85
        z = z + HEADWALL_SLOPE * np.clip(-along, 0.0, None)
        below = np.clip(along - self.length_m, 0.0, None)  # the valley goes on 3 km, then closes
        return (
            z
            - 0.08 * np.minimum(below, 3000.0)
            + VALLEY_WALL_SLOPE * np.clip(below - 3000.0, 0.0, None)
        )

    def margin_taper(self, along: np.ndarray, across: np.ndarray) -> np.ndarray:
        """0 at the outline rising to 1 at margin_taper_m inside (all 1 when it is 0): thin ice
        at the margin changes little. Without it a tongue's change is a step of tens of metres
        into the stable ground, more than half a height of ambiguity (what real tongues do, and
        what `mbcube.unwrap.profiles` is for)."""
        if self.margin_taper_m <= 0:
            return np.ones(np.shape(along))
        inside_m = np.minimum(
            self.half_width_m(along) - across, np.minimum(along, self.length_m - along)
        )
        return np.clip(inside_m / self.margin_taper_m, 0.0, 1.0)

    def rate_m_yr(self, z: np.ndarray) -> np.ndarray:
        """True elevation-change rate (m/yr) at true elevation z (m)."""
        dz = z - self.z_mid_m
        if self.surge:  # surge: the tongue thickens while the reservoir above thins
            return np.clip(self.rate_mean_m_yr - self.rate_gradient_per_m * dz, -3.0, 4.0)
        return np.clip(self.rate_mean_m_yr + self.rate_gradient_per_m * dz, -4.0, 1.5)


@dataclass(frozen=True)
class WorldFields:
    """The true state of the world at some points (arrays of one shape)."""

    surface_2000_m: np.ndarray  # true surface at the reference date
    glacier: np.ndarray  # int32, 0 off-glacier
    surface_type: np.ndarray  # int8: 0 off, 1 clean, 2 debris
    rate_m_yr: np.ndarray  # true dh/dt, 0 off-glacier
    penetration_c_m: np.ndarray  # C-band penetration (m, >= 0)
    penetration_x_m: np.ndarray  # X-band penetration (m, >= 0)
    ndsi: np.ndarray
    void: np.ndarray  # bool, SRTM void


class World:
    """All glaciers of a study and the seed of its random fields."""

    def __init__(self, glaciers: list[Glacier], seed: int, base_elevation_m: float = 5900.0):
        self.glaciers = glaciers
        self.seed = seed
        self.base_elevation_m = base_elevation_m
        self.outlines = [g.outline() for g in glaciers]
        reach = [
            shapely.box(*p.bounds).buffer(g.width_m + 2500.0)
            for g, p in zip(glaciers, self.outlines, strict=True)
        ]
        self._tree = shapely.STRtree(reach)
        self._outline_tree = shapely.STRtree(self.outlines)

    def glaciers_near(self, bounds: tuple[float, float, float, float]) -> list[Glacier]:
        idx = self._tree.query(shapely.box(*bounds))
        return [self.glaciers[i] for i in sorted(idx)]

    def glacier_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Index (1..N) of the glacier whose outline holds each point, 0 elsewhere."""
        out = np.zeros(x.shape, dtype=np.int32)
        box = shapely.box(x.min(), y.min(), x.max(), y.max())
        for i in sorted(self._outline_tree.query(box)):
            inside = shapely.contains_xy(self.outlines[i], x, y)
            out[inside] = self.glaciers[i].index
        return out

    def terrain_m(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True surface elevation at the reference date (m): relief with glacier valleys carved in."""
        seed = self.seed
        relief = fractal_noise(x, y, (14000.0, 4500.0, 1500.0, 450.0), seed + 1)
        ridges = np.abs(value_noise(x, y, 2500.0, seed + 2))
        z = self.base_elevation_m + 700.0 * relief + 600.0 * ridges
        bounds = (float(x.min()), float(y.min()), float(x.max()), float(y.max()))
        floors = []
        for g in self.glaciers_near(bounds):
            along, across = g.local_coords(x, y)
            half = g.half_width_m(along)
            axis = g.axis_elevation_m(along)
            on_floor = across <= half
            valley = np.where(
                on_floor,
                axis + 30.0 * (across / np.maximum(half, 1.0)) ** 2,
                axis + 30.0 + VALLEY_WALL_SLOPE * (across - half),
            )
            z = np.minimum(z, valley)
            floors.append((on_floor & (along >= 0) & (along <= g.length_m), valley))
        for (
            on_floor,
            valley,
        ) in floors:  # a glacier's surface is its own profile, whatever surrounds it
            z = np.where(on_floor, valley, z)
        return z

    def slope_x(self, x: np.ndarray, y: np.ndarray, step_m: float = 15.0) -> np.ndarray:
        """Terrain slope dz/dx (m/m), central difference."""
        return (self.terrain_m(x + step_m, y) - self.terrain_m(x - step_m, y)) / (2.0 * step_m)

    def fields(self, x: np.ndarray, y: np.ndarray) -> WorldFields:
        """The true world at points x, y (grid CRS, m)."""
        seed = self.seed
        z = self.terrain_m(x, y)
        bounds = (float(x.min()), float(y.min()), float(x.max()), float(y.max()))
        near = self.glaciers_near(bounds)
        glacier = self.glacier_index(x, y)
        surface_type = np.zeros(x.shape, dtype=np.int8)
        rate = np.zeros(x.shape)
        pen_c = np.zeros(x.shape)
        by_index = {g.index: g for g in near}
        for index in np.unique(glacier[glacier > 0]):
            g = by_index[int(index)]
            on = glacier == index
            along, across = g.local_coords(x[on], y[on])
            debris = along / g.length_m > g.debris_from
            surface_type[on] = np.where(debris, SURFACE_DEBRIS, SURFACE_CLEAN)
            rate[on] = g.rate_m_yr(z[on]) * g.margin_taper(along, across)
            pen_c[on] = g.penetration_factor * penetration_c_law(z[on], debris)
        pen_x = 0.3 * pen_c
        snow_off_glacier = np.clip((z - 5800.0) / 400.0, 0.0, 1.0)
        ndsi_noise = 0.08 * value_noise(x, y, 300.0, seed + 3)
        ndsi = np.where(
            surface_type == SURFACE_CLEAN,
            0.62 + ndsi_noise,
            np.where(
                surface_type == SURFACE_DEBRIS,
                0.12 + ndsi_noise,
                0.05 + 0.6 * snow_off_glacier + ndsi_noise,
            ),
        )
        void = (value_noise(x, y, 700.0, seed + 4) > 1.9) & (z > 4800.0)
        return WorldFields(
            z, glacier, surface_type, rate, pen_c, pen_x, ndsi.astype(np.float32), void
        )


def penetration_c_law(z: np.ndarray, debris: np.ndarray) -> np.ndarray:
    """C-band penetration into snow, firn and ice (m): deeper higher up, shallow on debris."""
    clean = np.clip(1.2 + 0.0025 * (z - 4500.0), 0.6, 4.5)
    return np.where(debris, 0.3, clean)


def reference_noise_m(x: np.ndarray, y: np.ndarray, seed: int, sigma_m: float) -> np.ndarray:
    """SRTM-like elevation error (m): spatially correlated (~500 m) plus a little white noise."""
    correlated = value_noise(x, y, 500.0, seed)
    white = normal(
        np.round(x * 7.0).astype(np.int64), np.round(y * 7.0).astype(np.int64), seed + 11
    )
    return sigma_m * (0.9 * correlated + 0.436 * white)


def make_glaciers(
    rng: np.random.Generator,
    bounds: tuple[float, float, float, float],
    n_target: int,
    area_km2_range: tuple[float, float] = (0.3, 50.0),
    surge_fraction: float = 0.06,
    margin_m: float = 600.0,
    margin_taper_m: float = MARGIN_TAPER_M,
    gradient_scale: float = 1.0,
) -> list[Glacier]:
    """Place up to n_target non-overlapping glaciers inside bounds (grid CRS, m);
    gradient_scale multiplies every glacier's d(rate)/dz (steeper balance gradients)."""
    left, bottom, right, top = bounds
    span = min(right - left, top - bottom)
    max_area = min(area_km2_range[1], (span / 1000.0) ** 2 / 12.0)
    placed: list[Glacier] = []
    shapes: list[Polygon] = []
    inner = shapely.box(left + margin_m, bottom + margin_m, right - margin_m, top - margin_m)
    for _ in range(n_target * 60):
        if len(placed) >= n_target:
            break
        area_km2 = float(
            np.exp(
                rng.uniform(
                    np.log(area_km2_range[0]), np.log(max(max_area, area_km2_range[0] * 1.5))
                )
            )
        )
        aspect = rng.uniform(0.18, 0.35)
        length = float(np.sqrt(area_km2 * 1e6 / (aspect * 0.68)))
        width = aspect * length
        z_head = rng.uniform(5400.0, 6300.0)
        drop = length * np.tan(np.radians(rng.uniform(7.0, 14.0)))
        surge = bool(rng.random() < surge_fraction) and area_km2 > 2.0
        g = Glacier(
            index=len(placed) + 1,
            head_x=rng.uniform(left, right),
            head_y=rng.uniform(bottom, top),
            angle_rad=rng.uniform(0, 2 * np.pi),
            length_m=length,
            width_m=width,
            bend_m=rng.uniform(-0.3, 0.3) * width,
            z_head_m=z_head,
            z_term_m=max(z_head - drop, 3300.0),
            debris_from=rng.uniform(0.55, 0.85) if area_km2 > 1.5 else 2.0,
            rate_mean_m_yr=rng.normal(-0.25, 0.25) if not surge else rng.normal(0.2, 0.2),
            rate_gradient_per_m=gradient_scale
            * (rng.uniform(0.002, 0.005) if not surge else rng.uniform(0.004, 0.007)),
            surge=surge,
            penetration_factor=float(np.clip(rng.normal(1.0, 0.15), 0.5, 1.5)),
            margin_taper_m=margin_taper_m,
        )
        shape = g.outline()
        if not inner.contains(shape):
            continue
        if any(shape.distance(other) < 300.0 for other in shapes):
            continue
        placed.append(g)
        shapes.append(shape)
    return placed
