"""`ds.mb`: the cube's questions as methods of any cube Dataset (registered by `import mbcube`).

Each method is a one-line wrap of a function of `mbcube.query`; the accessor holds no logic.

    ds = xr.open_zarr("stores/demo/cube.zarr")
    ds.mb.profile(glacier="G0003")            # dh per 50 m bin and scene, with hypsometry
    ds.mb.dh_series(region="north")           # mean dh per scene
    ds.mb.mass_balance(region="north")        # m w.e./yr with uncertainty
"""

from __future__ import annotations

import xarray as xr

from mbcube import query


@xr.register_dataset_accessor("mb")
class MassBalanceAccessor:
    """Glacier and region queries on a cube opened with `xr.open_zarr(store)`."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def glacier_index(self, key: int | str) -> int:
        """The glacier number (1..N) of an outline id (e.g. RGIId) or number."""
        return query.glacier_index(self._ds, key)

    def pixels(self, *, glacier: int | str | None = None, region: str | None = None) -> xr.Dataset:
        """(y, x) layers masked outside the glacier's / region's glacier pixels (lazy)."""
        return query.pixels(self._ds, glacier=glacier, region=region)

    def profile(
        self,
        *,
        glacier: int | str | None = None,
        region: str | None = None,
        surface: str | None = None,
    ) -> xr.Dataset:
        """dh per elevation bin and scene (count, mean_dh_m, std_dh_m) and hypsometry (lazy)."""
        return query.profile(self._ds, glacier=glacier, region=region, surface=surface)

    def dh_series(
        self, *, glacier: int | str | None = None, region: str | None = None
    ) -> xr.DataArray:
        """Mean measured dh (m) per scene (lazy)."""
        return query.dh_series(self._ds, glacier=glacier, region=region)

    def mass_balance(
        self, *, glacier: int | str | None = None, region: str | None = None
    ) -> xr.Dataset:
        """Mass balance (m w.e./yr), dh/dt (m/yr) and their uncertainty terms."""
        return query.mass_balance(self._ds, glacier=glacier, region=region)
