"""The unwrap step on a cube: for each insar scene, unwrap, stitch, tie and write
phase_unw_rad, component, dh_raw_m and the per-scene quality numbers.

DEM-kind scenes are skipped (the correction step computes their dh). A scene is recomputed
only when its ingest record or the unwrap parameters changed (or force).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from mbcube.cluster import SceneJob, compute_scenes
from mbcube.config import UnwrapConfig
from mbcube.errors import StoreError
from mbcube.store import (
    invalidate,
    is_current,
    open_cube,
    record_step,
    recorded_config,
    require_intact,
    scene_index,
    scene_outputs,
    step_record,
    write_scene_region,
    writes_store,
)
from mbcube.unwrap.repair import GLACIER_VARIABLES
from mbcube.unwrap.scene import QUALITY_VARIABLES, unwrap_scene

STEP = "unwrap"

ATTRS: dict[str, dict[str, str]] = {
    "phase_unw_rad": {
        "long_name": "unwrapped differential phase, stitched and tied to stable ground",
        "units": "rad",
    },
    "component": {
        "long_name": "stitched unwrapping component (0 = not unwrapped)",
        "flag_values": "0 = not unwrapped; 1..N by decreasing size",
    },
    "dh_raw_m": {
        "long_name": "elevation change before corrections: phase_unw * h_amb / (2 pi); "
        "NaN where not unwrapped or in components not tied to stable ground",
        "units": "m",
    },
}


def _small(store: Path, name: str) -> np.ndarray:
    """A small per-scene coordinate read straight from the store (not a dask compute)."""
    return np.asarray(zarr.open_array(str(store / name), mode="r")[:])


def scene_graph(store: Path, scene_id: str, config: UnwrapConfig) -> xr.Dataset:
    """The lazy outputs of one scene (dims starting with a length-1 `scene`), ready for
    `write_scene_region`. Builds the graph only; nothing is computed."""
    ds = open_cube(store)
    ids = [str(s) for s in ds["scene"].values]
    if scene_id not in ids:
        raise StoreError(f"{store}: no complete scene {scene_id!r}; scenes: {ids}")
    index = scene_index(store)[scene_id]
    missing = [v for v in ("phase_rad", "coherence", "h_amb_m") if v not in ds]
    if missing:
        raise StoreError(f"{store}: the cube has no {missing}: nothing to unwrap.")
    nlooks = float(_small(store, "scene_nlooks")[index]) if "scene_nlooks" in ds.coords else None
    scene = ds.isel(scene=ids.index(scene_id))
    glaciers = "glacier_id" in ds and "ref_dem_m" in ds and "glacier" in ds.dims
    out = unwrap_scene(
        scene["phase_rad"].data,
        scene["coherence"].data,
        scene["h_amb_m"].data,
        scene["radar_mask"].data if "radar_mask" in scene else None,
        ds["stable"].data if "stable" in ds else None,
        ds["ref_void"].data if "ref_void" in ds else None,
        glacier_id=ds["glacier_id"].data if glaciers else None,
        elevation_m=ds["ref_dem_m"].data if glaciers else None,
        prior_dh_m=_prior_dh(ds, scene) if "prior_dhdt_m_yr" in ds else None,
        n_glaciers=ds.sizes["glacier"] if glaciers else None,
        config=config,
        nlooks=nlooks,
        scene_id=scene_id,
    )
    dims = ("scene", "y", "x")
    data: dict[str, Any] = {
        "phase_unw_rad": (dims, out.phase_unw_rad[None], ATTRS["phase_unw_rad"]),
        "component": (dims, out.component[None], ATTRS["component"]),
        "dh_raw_m": (dims, out.dh_raw_m[None], ATTRS["dh_raw_m"]),
    }
    for name, (_, doc) in QUALITY_VARIABLES.items():
        data[name] = (("scene",), out.quality[name][None], {"long_name": doc})
    for name, (_, doc) in GLACIER_VARIABLES.items():
        if name in out.glacier_flags:
            data[name] = (("scene", "glacier"), out.glacier_flags[name][None], {"long_name": doc})
    return xr.Dataset(data)


def _prior_dh(ds: xr.Dataset, scene: xr.Dataset) -> Any:
    """The user's prior dh (m) of a scene: the study's prior rate (m/yr) x the scene's years
    since the reference date (lazy)."""
    return ds["prior_dhdt_m_yr"].data * np.float32(scene["scene_years"].values)


@writes_store
def unwrap_cube(
    store: Path,
    config: UnwrapConfig | None = None,
    *,
    scenes: Sequence[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Unwrap the insar scenes of the cube at `store` (all complete ones, or `scenes`) and write
    phase_unw_rad (rad), component, dh_raw_m (m) and the unwrap_* quality numbers. Skips scenes
    that are up to date unless `force`. Returns the ids it (re)computed. Holds the store's
    writer lock."""
    say = progress or (lambda _msg: None)
    config = config or recorded_config(store).unwrap
    ds = open_cube(store)
    ids = [str(s) for s in ds["scene"].values]
    kinds = dict(zip(ids, (str(k) for k in ds["scene_kind"].values), strict=True))
    wanted = list(scenes) if scenes is not None else ids
    unknown = [s for s in wanted if s not in kinds]
    if unknown:
        raise StoreError(f"{store}: no complete scene(s) {unknown}; scenes: {ids}")
    index = scene_index(store)
    jobs = []
    for scene_id in wanted:
        if kinds[scene_id] != "insar":
            say(f"unwrap {scene_id}: {kinds[scene_id]} scene, nothing to unwrap")
            continue
        record = {
            "params": config.model_dump(mode="json"),
            "upstream": step_record(store, "ingest", scene_id).get("token"),
        }
        if not force and is_current(store, STEP, scene_id, record):
            say(f"unwrap {scene_id}: up to date")
            continue
        require_intact(store, "ingest", scene_id, f"`mbcube ingest STUDY --store {store}`")
        jobs.append(_scene_job(store, scene_id, index[scene_id], config, record))
    return compute_scenes(jobs)


def _scene_job(
    store: Path, scene_id: str, index: int, config: UnwrapConfig, record: dict[str, Any]
) -> SceneJob:
    """Unwrapping one scene: its record forgotten, its layers written at its index, then the
    step recorded with the files it wrote."""
    outputs: list[str] = []

    def build() -> list[Any]:
        graph = scene_graph(store, scene_id, config)
        invalidate(store, STEP, scene_id)
        outputs.extend(scene_outputs([str(n) for n in graph.data_vars], index))
        return [write_scene_region(store, graph, index, compute=False)]

    def finish(_: list[Any]) -> None:
        record_step(store, STEP, scene_id, record, outputs=outputs)

    return SceneJob(scene_id, f"unwrap scene {scene_id}", build, finish)
