"""Questions users ask a cube, as lazy xarray objects: a glacier's or region's pixels, its dh
series, its elevation profile and its mass balance. `ds.mb` (mbcube.accessor) wraps these.

`ds` is the cube as `xr.open_zarr(store)` (or `mbcube.store.open_cube`) returns it; the stored
statistics groups are found beside it through `ds.encoding["source"]`. These are readers: they
take no lock and write nothing (`read_stats`).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import xarray as xr

from mbcube.errors import MbcubeWarning, StoreError

#: Surface codes of the `surface` layer and the statistics' `surface` dimension.
SURFACES = {"clean": 1, "debris": 2}


def store_of(ds: xr.Dataset) -> Path:
    """The store a cube Dataset was opened from."""
    source = ds.encoding.get("source")
    if not source:
        raise StoreError(
            "This Dataset was not opened from a cube store (no encoding['source']); "
            "open it with xr.open_zarr(store) or mbcube.store.open_cube(store)."
        )
    return Path(source)


T = TypeVar("T")


def read_stats(store: Path, read: Callable[[Path], T]) -> T:
    """`read(store)` as a reader: no lock taken, nothing written. While another process writes
    the store, a warning says the values may change, and what is not written yet is said as
    such instead of a read error."""
    from mbcube.store.lock import writer_status  # here: `import mbcube` stays light

    status = writer_status(store)
    writing = status if status and status.endswith("(writing)") else None
    if writing:
        warnings.warn(
            f"{store} is being written ({writing}): these values may change when it finishes",
            MbcubeWarning,
            stacklevel=3,
        )
    try:
        return read(store)
    except (FileNotFoundError, KeyError, ValueError) as err:
        if writing is None:
            raise
        raise StoreError(
            f"{store} is being written ({writing}) and its statistics are not complete: ask "
            "again when it finishes."
        ) from err


def open_group(ds: xr.Dataset, group: str) -> xr.Dataset:
    """A stored group of the cube ('stats', 'hypsometry', 'penetration'), lazily."""
    store = store_of(ds)
    if not (store / group / "zarr.json").exists():
        step = "correct" if group == "penetration" else "bin"
        raise StoreError(f"{store}: no '{group}' group yet. Run `mbcube {step} {store}` first.")
    return xr.open_zarr(str(store), group=group, chunks={})


def glacier_index(ds: xr.Dataset, key: int | str) -> int:
    """The cube's glacier number (1..N) of a glacier given by number or by outline id (RGIId)."""
    numbers = ds["glacier"].values
    if isinstance(key, (int, np.integer)):
        if int(key) not in numbers:
            raise KeyError(f"glacier {key} is not in this cube (glaciers 1..{numbers.max()}).")
        return int(key)
    ids = [str(v) for v in ds["glacier_rgi_id"].values]
    if key not in ids:
        near = difflib.get_close_matches(str(key), ids, n=3)
        raise KeyError(f"glacier {key!r} is not in this cube; close ids: {near}")
    return int(numbers[ids.index(key)])


def _glaciers(ds: xr.Dataset, glacier: int | str | None, region: str | None) -> list[int]:
    if (glacier is None) == (region is None):
        raise ValueError("give exactly one of glacier= (number or id) or region= (name)")
    if glacier is not None:
        return [glacier_index(ds, glacier)]
    return glaciers_in_region(ds, str(region))


def glaciers_in_region(ds: xr.Dataset, name: str) -> list[int]:
    """Glacier numbers of a region (a polygon of the study's regions, assigned as the tables
    assign them) or of a basin (the outlines' `basin` attribute)."""
    if "region_name" in ds and name in [str(v) for v in ds["region_name"].values]:
        from mbcube.aggregate import load_stats, region_sets

        # the assignment rule of the tables, no balance computed
        data = read_stats(store_of(ds), lambda store: load_stats(store, cache=False))
        region = region_sets(data)[0].region_of()
        return [int(g) for g in data.glacier[region == name]]
    if "glacier_attr_basin" in ds:
        basins = np.array([str(v) for v in ds["glacier_attr_basin"].values])
        if name in basins:
            return [int(g) for g in ds["glacier"].values[basins == name]]
    known = [str(v) for v in ds.get("region_name", xr.DataArray([])).values]
    raise KeyError(f"region {name!r} is not in this cube; regions: {known}")


def pixels(
    ds: xr.Dataset, *, glacier: int | str | None = None, region: str | None = None
) -> xr.Dataset:
    """The cube's (y, x) layers masked (NaN) outside a glacier's or region's glacier pixels, lazily."""
    numbers = _glaciers(ds, glacier, region)
    inside = ds["glacier_id"].isin(numbers)
    spatial = [name for name, var in ds.data_vars.items() if {"y", "x"} <= set(var.dims)]
    return ds[spatial].where(inside)


def profile(
    ds: xr.Dataset,
    *,
    glacier: int | str | None = None,
    region: str | None = None,
    surface: str | None = None,
) -> xr.Dataset:
    """dh per elevation bin (lower edge, m) and scene: count, mean_dh_m, std_dh_m (m), and the
    hypsometry area_m2 per bin; for one glacier or the glaciers of a region, one surface
    ('clean', 'debris') or both. Lazy."""
    numbers = _glaciers(ds, glacier, region)
    stats = open_group(ds, "stats").sel(glacier=numbers)
    hyps = open_group(ds, "hypsometry").sel(glacier=numbers)
    dims = ["glacier"]
    if surface is not None:
        stats = stats.sel(surface=SURFACES[surface])
        hyps = hyps.sel(surface=SURFACES[surface])
    else:
        dims.append("surface")
    count = stats["count"].sum(dims)
    total = stats["sum_dh_m"].sum(dims)
    squares = stats["sumsq_dh_m2"].sum(dims)
    counted = count.where(count > 0)  # NaN for empty bins: no division by zero
    mean = total / counted
    variance = (squares / counted - mean**2).clip(min=0)
    std = (variance * counted / (counted - 1).where(count > 1)) ** 0.5
    return xr.Dataset(
        {
            "count": count,
            "mean_dh_m": mean.assign_attrs(units="m"),
            "std_dh_m": std.assign_attrs(units="m"),
            "area_m2": hyps["area_m2"].sum(dims).assign_attrs(units="m2"),
        }
    )


def dh_series(
    ds: xr.Dataset, *, glacier: int | str | None = None, region: str | None = None
) -> xr.DataArray:
    """Mean measured dh (m) per scene over a glacier's or region's measured pixels, lazily
    (pixel-weighted; the hypsometric mean is in `mass_balance`)."""
    numbers = _glaciers(ds, glacier, region)
    stats = open_group(ds, "stats").sel(glacier=numbers)
    count = stats["count"].sum(["glacier", "bin", "surface"])
    mean = stats["sum_dh_m"].sum(["glacier", "bin", "surface"]) / count.where(count > 0)
    return mean.rename("dh_m").assign_attrs(units="m")


def mass_balance(
    ds: xr.Dataset, *, glacier: int | str | None = None, region: str | None = None
) -> xr.Dataset:
    """Mass balance (m w.e./yr), dh/dt (m/yr), volume and mass change with each uncertainty term,
    for a glacier or a region (dims: glaciers = all | no_surge), from the stored statistics."""
    from mbcube.aggregate import mass_balance_dataset, regions_dataset

    if (glacier is None) == (region is None):
        raise ValueError("give exactly one of glacier= (number or id) or region= (name)")
    store = store_of(ds)
    if glacier is not None:
        table = read_stats(store, lambda s: mass_balance_dataset(s, cache=False))
        return table.sel(glacier=glacier_index(ds, glacier))
    table = read_stats(store, lambda s: regions_dataset(s, cache=False))
    if region not in table["region"].values:
        raise KeyError(f"region {region!r}: regions are {list(table['region'].values)}")
    return table.sel(region=region)
