"""Accuracy of the recovered mass balance against the synthetic truth (issue 5's acceptance).

For each case (study kind x study shape x seed) a synthetic study is generated, run end to end
(`mbcube.pipeline.run`, cluster="threads") in a child process, and compared with `truth/`:

- glaciers with > 50 % coverage: median absolute error of mb_mwe_yr, share of glaciers whose
  error is within the stated 1 sigma and 2 sigma, per kind and glacier-size class;
- regions (the region table's rows against truth/regions.csv): absolute errors;
- an error decomposition per glacier, from the pixels each scene measured (stored `dh_m`):
  residual = dh_m - true rate x span, split into
    reference: minus the SRTM-C error the generator added (a pure function of map coordinates and
               the seed, `mbcube.synth.world.reference_noise_m`), common to all scenes;
    penetration: true C-X penetration (truth/penetration_m.tif) minus the stored table's value
               (the `penetration` group, looked up as the correction does, with the glacier's
               own X-band offset added where the store applies them: 'xband_glacier');
    scene: the rest (datum/ramp residual, seasonal deviation, phase noise, unwrapping errors);
  each averaged over the glacier's measured pixels, divided by the scene's span, averaged over
  scenes with the pixel counts as weights, in m w.e./yr. `void` is what the glacier's area
  without any elevation adds (it takes the glacier's mean): void share x (estimated rate - the
  void's true rate) x density; SRTM-C voids that binning gives a substitute elevation (SRTM-X,
  then the reference interpolated across the void: `mbcube.binning.void_elevation`) take their
  bins' rates: what they add is in `sampling`, the glacier's actual error minus the four: what
  hypsometric averaging and gap filling of the binned area add or remove.
  `adjusted` (0/1): the glacier has its own X-band offset (a surface with weight k > 0, offsets
  applied); its reference error is then in the stated penetration term (`mbcube.uncertainty`),
  so the calibration by term (`z_random`, `z_penetration`) pairs scene / sigma_random and
  (ref + pen) / sigma_penetration for it, (ref + scene) / sigma_random and pen /
  sigma_penetration for the others.

The tables are made by `mbcube.aggregate` as the pipeline runs it (its results come from
`mbcube.massbalance.unit_results`: every error term, the unmeasured-area term included, and the
minimum measured share per bin).

Region rows (`region_decomposition`): each row's error split into the same parts, combined with
the weights of the pipeline's area-weighted glacier mean, plus what region-level hypsometric
averaging and membership add (exact sum); reference and own-penetration parts split between
glaciers with and without their own SRTM-X (the latter cannot be observed), for the question
whether a region's error above 0.02 m w.e./yr is what no estimator could remove. The whole-study
row 'all' is compared too (its truth: the area-weighted mean of all true glacier rates).

Usage: python -m benchmarks.accuracy [--work DIR] [--seeds 1 2 3] [--shapes ...] [--kinds ...]
       [--keep] [--override JSON]
Per-glacier rows go to WORK/glaciers.csv, region rows with their parts to WORK/regions.csv and
WORK/region_rows.csv, the summary tables to stdout (markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing as mp
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mbcube.aggregate import SIGMA_COLUMNS

DENSITY = 0.85  # the generator's density (850 kg/m3) in m w.e. per m

#: Study shapes: glacier sizes are log-uniform from 0.3 km2 up to (span in km)^2 / 12, so the
#: grid size sets how large glaciers get.
SHAPES: dict[str, dict[str, Any]] = {
    "448px-24g-4s": {"size_px": 448, "n_glaciers": 24, "n_scenes": 4},
    "768px-20g-6s": {"size_px": 768, "n_glaciers": 20, "n_scenes": 6, "tile_px": 256},
    # many glaciers per region (the generator places all 150: 20-31 % of the area glacierized;
    # 32-44 glaciers in each eastern quarter region, 68-82 in the western half)
    "1024px-150g-4s": {"size_px": 1024, "n_glaciers": 150, "n_scenes": 4, "tile_px": 256},
}
KINDS = ("dem", "insar")
SIZE_CLASSES = ((0.0, 1.0, "<1 km2"), (1.0, 5.0, "1-5 km2"), (5.0, np.inf, ">5 km2"))
#: Regions by number of member glaciers (region rows).
REGION_SIZES = ((0, 10, "<10"), (10, 20, "10-19"), (20, 50, "20-49"), (50, 10**9, ">=50"))
#: A glacier has its own SRTM-X when at least this share of its pixels has an X-band value.
XBAND_MIN_SHARE = 0.5
#: Region error decomposition columns (m w.e./yr; `region_decomposition`).
REGION_PARTS = (
    "ref_x",
    "ref_nox",
    "pen_dev_x",
    "pen_dev_nox",
    "pen_table_x",
    "pen_table_nox",
    "seasonal",
    "noise",
    "scene_rest",
    "void",
    "sampling",
    "averaging",
    "weights",
)


@dataclass(frozen=True)
class Case:
    kind: str
    shape: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.shape}-s{self.seed}"


def run_case(
    case: Case,
    work: Path,
    keep: bool = False,
    overrides: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Generate, run and evaluate one case (in this process); per-glacier rows."""
    from mbcube.pipeline import load_pipeline, run
    from mbcube.synth import generate_study

    warnings.filterwarnings("ignore", message="penetration.*pooled table")
    root = work / case.name
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    study = generate_study(
        root / "study", "tiny", kind=case.kind, seed=case.seed, **SHAPES[case.shape]
    )
    t1 = time.perf_counter()
    pipeline = load_pipeline(study, cluster="threads")
    if overrides:
        pipeline = dataclasses.replace(pipeline, overrides=overrides)
    run(pipeline)
    t2 = time.perf_counter()
    rows = evaluate(study, pipeline.store, pipeline.out).assign(model="default")
    regions = with_parts(rows, evaluate_regions(study, pipeline.out)).assign(model="default")
    # the same statistics with the reference error bounded by SRTM-C minus SRTM-X on stable
    # ground (what aggregate passes once the corrections store that spread)
    bound = reference_bound_m(pipeline.store)
    if np.isfinite(bound):
        from mbcube.aggregate import aggregate
        from mbcube.store import recorded_config

        config = recorded_config(pipeline.store).massbalance
        config = config.model_copy(update={"reference_sigma_m": bound})
        out_cx = pipeline.out.parent / "results_cx_bound"
        aggregate(pipeline.store, out_cx, regions=pipeline.regions, config=config)
        rows_cx = evaluate(study, pipeline.store, out_cx)
        rows = pd.concat([rows, rows_cx.assign(model="cx_bound")], ignore_index=True)
        rows_cx = evaluate(study, pipeline.store, out_cx)
        regions = pd.concat(
            [
                regions,
                with_parts(rows_cx, evaluate_regions(study, out_cx)).assign(model="cx_bound"),
            ],
            ignore_index=True,
        )
    rows = rows.assign(kind=case.kind, shape=case.shape, seed=case.seed, cx_bound_m=bound)
    regions = regions.assign(kind=case.kind, shape=case.shape, seed=case.seed)
    regions.to_csv(work / f"{case.name}.regions.csv", index=False)
    (work / f"{case.name}.time.json").write_text(
        json.dumps({"generate_s": t1 - t0, "run_s": t2 - t1, "load": os.getloadavg()})
    )
    if not keep:
        shutil.rmtree(root)
    return rows


def _weighted_sum(
    rows: pd.DataFrame, w: pd.Series, col: str, mask: np.ndarray | None = None
) -> float:
    """sum of w x rows[col] (over `mask` when given)."""
    v = (w * rows[col]).to_numpy()
    return float(v.sum() if mask is None else v[mask].sum())


def with_parts(glaciers: pd.DataFrame, regions: pd.DataFrame) -> pd.DataFrame:
    """The region rows with their error decomposition (`region_decomposition`) as columns."""
    parts = region_decomposition(glaciers, regions)
    return regions.merge(parts, on=["name", "glaciers"], how="left")


def reference_bound_m(store: Path) -> float:
    """NMAD (m) of SRTM-X minus SRTM-C on the cube's stable ground: sqrt(sigma_C^2 + sigma_X^2),
    an upper bound of the reference DEM's error measured from the data (NaN without SRTM-X)."""
    from mbcube.store import open_cube

    cube = open_cube(store)
    if "ref_dem_x_m" not in cube:
        return float("nan")
    diff = (cube["ref_dem_x_m"] - cube["ref_dem_m"]).values
    diff = diff[(cube["stable"].values == 1) & np.isfinite(diff)]
    if diff.size < 100:
        return float("nan")
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))))


def evaluate(study: Path, store: Path, out: Path) -> pd.DataFrame:
    """Per glacier: pipeline against truth, and the error decomposition (module docstring)."""
    truth = pd.read_csv(study / "truth" / "glaciers.csv")
    table = pd.read_csv(out / "glaciers.csv")
    both = table.merge(truth, on="RGIId", suffixes=("", "_true"))
    both["error_mwe_yr"] = both["mb_mwe_yr"] - both["mb_mwe_yr_true"]
    parts = decompose(study, store)
    both = both.merge(parts, left_on="RGIId", right_index=True, how="left")
    both["void_mwe_yr"] = (
        both["void_frac"] * (both["dhdt_m_yr"] - both["void_true_m_yr"]).fillna(0.0) * DENSITY
    )
    known = both[["ref_mwe_yr", "pen_mwe_yr", "scene_mwe_yr", "void_mwe_yr"]].sum(
        axis=1, min_count=4
    )
    both["sampling_mwe_yr"] = both["error_mwe_yr"] - known
    keep = [
        "RGIId",
        "area_km2",
        "coverage_frac",
        "n_scenes",
        "mb_mwe_yr",
        "mb_mwe_yr_true",
        "error_mwe_yr",
        "mb_sigma_mwe_yr",
        *SIGMA_COLUMNS,
        "ref_mwe_yr",
        "pen_mwe_yr",
        "scene_mwe_yr",
        "void_mwe_yr",
        "sampling_mwe_yr",
        "pen_dev_mwe_yr",
        "seasonal_mwe_yr",
        "noise_mwe_yr",
        "ref_all_mwe_yr",
        "void_frac",
        "void_c_frac",
        "x_frac",
        "penetration_factor",
        "adjusted",
        "region",
        "surge",
    ]
    return both[[k for k in keep if k in both]]


def decompose(study: Path, store: Path) -> pd.DataFrame:
    """Per glacier (index RGIId): the mean reference, penetration and scene error of its measured
    pixels, in m w.e./yr (module docstring); `ref_all_mwe_yr` is the reference error over ALL its
    pixels divided by the mean span (what a perfect method would still carry); `void_frac` its
    share of pixels without any elevation (void in SRTM-C and without a substitute elevation,
    `void_elevation_m`; `void_c_frac` void in SRTM-C) and `void_true_m_yr` their true mean rate; `adjusted` 1 where the glacier has its own
    X-band offset (module docstring).

    Parts of parts (same averaging): `pen_dev_mwe_yr`, the glacier's own penetration deviation
    (true penetration x (1 - 1 / its penetration factor): what differs from the regional law the
    generator draws every glacier's factor around; the rest of `pen` is the table's error);
    `seasonal_mwe_yr`, the scenes' true seasonal offset minus the one removed; `noise_mwe_yr`,
    the DEM scenes' own correlated noise (white noise too on scenes written on the study grid;
    zero for InSAR scenes, whose phase noise is white). Both are in `scene`. `x_frac`: the share
    of the glacier's pixels with an SRTM-X value."""
    import rasterio
    import xarray as xr

    from mbcube.corrections import penetration
    from mbcube.corrections.step import read_table
    from mbcube.store import open_cube
    from mbcube.synth import SynthSpec, world_noise
    from mbcube.synth.noise import normal
    from mbcube.synth.world import make_glaciers, reference_noise_m

    meta = json.loads((study / "truth" / "meta.json").read_text())
    spec = meta["spec"]
    cube = open_cube(store)
    with rasterio.open(study / "truth" / "dhdt_m_yr.tif") as f:
        rate = f.read(1).astype(np.float64)
    with rasterio.open(study / "truth" / "penetration_m.tif") as f:
        pen_true = f.read(1).astype(np.float64)
    x = cube["x"].values.astype(np.float64)
    y = cube["y"].values.astype(np.float64)
    xx, yy = np.meshgrid(x, y)
    iy, ix = np.indices(xx.shape)
    ref_err = reference_noise_m(xx, yy, int(spec["seed"]) + 101, float(spec["reference_sigma_m"]))
    glacier = cube["glacier_id"].values.astype(np.int64)
    surface = cube["surface"].values
    region = cube["region_id"].values
    ref_dem = cube["ref_dem_m"].values.astype(np.float64)
    table = read_table(store)
    pen_tab = penetration.lookup(
        table.penetration_m, table.bin_lo_m, table.width_m, region, surface, ref_dem
    )
    adjusted = np.zeros(int(glacier.max()) + 1, dtype=int)
    if table.glacier_offset_m is not None:  # 'xband_glacier': the glacier's own offset too
        pen_tab = pen_tab + penetration.glacier_lookup(table.glacier_offset_m, glacier, surface)
        weight = xr.open_zarr(str(store), group="penetration", chunks=None)
        k = weight["glacier_penetration_weight"].transpose("glacier", "surface")
        ids_k = k["glacier"].values.astype(int)
        inside = ids_k < adjusted.size
        adjusted[ids_k[inside]] = (k.values[inside] > 0).any(axis=1)
    pen_err = pen_true - pen_tab  # what the correction leaves in dh (true minus removed)
    n = int(glacier.max()) + 1
    ids = xr.DataArray(cube["glacier_rgi_id"].values, dims="glacier")
    index = cube["glacier"].values.astype(int)
    # the generator's glaciers (same seed, same draws): each one's penetration factor
    grid = SynthSpec(**spec).grid
    drawn = make_glaciers(np.random.default_rng(int(spec["seed"])), grid.bounds, spec["n_glaciers"])
    factor_of = {f"RGI60-99.{g.index:05d}": g.penetration_factor for g in drawn}
    factor = np.ones(n)
    factor[index] = [factor_of.get(str(v), 1.0) for v in ids.values]
    pen_dev = pen_true * (1.0 - 1.0 / factor[glacier])
    scenes = pd.read_csv(study / "truth" / "scenes.csv")
    seasonal_true = dict(zip(scenes["scene_id"], scenes["seasonal_offset_m"], strict=True))
    scene_crs = dict(zip(scenes["scene_id"], scenes["crs"], strict=True))
    years = cube["scene_years"].values.astype(float)
    applied = (
        cube["seasonal_offset_applied_m"].values.astype(float)
        if "seasonal_offset_applied_m" in cube
        else np.zeros(cube.sizes["scene"])
    )
    parts = ("ref", "pen", "pen_dev", "seasonal", "noise", "scene")
    acc = {k: np.zeros(n) for k in ("w", *parts)}
    for s in range(cube.sizes["scene"]):
        sid = str(cube["scene"].values[s])
        dh = cube["dh_m"].isel(scene=s).values.astype(np.float64)
        on = np.isfinite(dh) & (glacier > 0)
        g = glacier[on]
        resid = dh[on] - rate[on] * years[s]
        noise = np.zeros(int(on.sum()))
        if str(cube["scene_kind"].values[s]) == "dem":  # mbcube.synth._scene_layers
            seed = int(spec["seed"]) * 1000 + int(sid[1:3]) - 1
            noise = 0.6 * world_noise(xx[on], yy[on], seed)
            if scene_crs[sid] == spec["crs"]:  # written on this grid: pixel for pixel
                noise = noise + 0.8 * normal(ix[on], iy[on], seed + 41)
        count = np.bincount(g, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {
                "ref": np.bincount(g, weights=-ref_err[on], minlength=n) / count,
                "pen": np.bincount(g, weights=pen_err[on], minlength=n) / count,
                "pen_dev": np.bincount(g, weights=pen_dev[on], minlength=n) / count,
                "noise": np.bincount(g, weights=noise, minlength=n) / count,
                "res": np.bincount(g, weights=resid, minlength=n) / count,
            }
        means["seasonal"] = np.full(n, float(seasonal_true[sid]) - applied[s])
        means["scene"] = means["res"] - means["ref"] - means["pen"]
        has = count > 0
        w = np.where(has, count, 0.0)
        span = abs(years[s])
        acc["w"] += w
        for k in parts:
            acc[k] += np.where(has, w * means[k] / span, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {k: DENSITY * acc[k] / acc["w"] for k in parts}
    all_px = np.bincount(glacier.ravel(), minlength=n)
    void = (glacier > 0) & ~np.isfinite(ref_dem)
    void_c_px = np.bincount(glacier[void], minlength=n)
    x_px = np.zeros(n)
    if "ref_dem_x_m" in cube:
        has_x = np.isfinite(cube["ref_dem_x_m"].values)
        x_px = np.bincount(glacier[has_x], minlength=n).astype(float)
    # binning bins SRTM-C voids by a substitute elevation where it has one (SRTM-X, then the
    # reference interpolated across the void): those take their bins' rates (in `sampling`)
    substitute = void_elevation_m(cube, store)
    if substitute is not None:
        void &= ~np.isfinite(substitute)
    void_px = np.bincount(glacier[void], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        void_true = np.bincount(glacier[void], weights=rate[void], minlength=n) / void_px
        ref_all = np.bincount(glacier.ravel(), weights=-ref_err.ravel(), minlength=n) / all_px
    ref_all = DENSITY * ref_all / np.mean(np.abs(years))
    return pd.DataFrame(
        {
            "ref_mwe_yr": out["ref"][index],
            "pen_mwe_yr": out["pen"][index],
            "scene_mwe_yr": out["scene"][index],
            "pen_dev_mwe_yr": out["pen_dev"][index],
            "seasonal_mwe_yr": out["seasonal"][index],
            "noise_mwe_yr": out["noise"][index],
            "ref_all_mwe_yr": ref_all[index],
            "void_frac": (void_px / np.maximum(all_px, 1))[index],
            "void_c_frac": (void_c_px / np.maximum(all_px, 1))[index],
            "void_true_m_yr": void_true[index],
            "x_frac": (x_px / np.maximum(all_px, 1))[index],
            "penetration_factor": factor[index],
            "adjusted": adjusted[np.clip(index, 0, adjusted.size - 1)],
        },
        index=pd.Index([str(v) for v in ids.values], name="RGIId"),
    )


def void_elevation_m(cube: Any, store: Path) -> np.ndarray | None:
    """The elevation (m) binning gives glacier pixels void in the reference DEM, by the
    library's own rule and the recorded void_fill_distance_m (NaN where none; None when the
    library has no substitute for voids)."""
    from mbcube import binning
    from mbcube.store import recorded_config

    res = abs(float(cube["x"].values[1] - cube["x"].values[0]))
    fill_px = round(recorded_config(store).massbalance.void_fill_distance_m / res)
    substitute = binning.void_elevation(cube, fill_px)
    return None if substitute is None else np.asarray(substitute.compute())


def evaluate_regions(study: Path, out: Path) -> pd.DataFrame:
    """Region rows against the truth: error and stated sigma with its terms (m w.e./yr). The
    truth of the whole-study row 'all' is the area-weighted mean of all true glacier rates (as
    truth/regions.csv is for the sub-regions)."""
    truth = pd.read_csv(study / "truth" / "regions.csv")
    glaciers = pd.read_csv(study / "truth" / "glaciers.csv")
    glaciers = glaciers[glaciers["area_km2"] > 0]
    whole = []
    for label, part in (("all", glaciers), ("no_surge", glaciers[glaciers["surge"] == 0])):
        area = part["area_km2"]
        whole.append(
            {
                "name": "all",
                "glaciers": label,
                "mb_mwe_yr": float((part["mb_mwe_yr"] * area).sum() / area.sum()),
            }
        )
    truth = pd.concat([truth, pd.DataFrame(whole)], ignore_index=True)
    table = pd.read_csv(out / "regions.csv")
    both = table.merge(truth, on=["name", "glaciers"], suffixes=("", "_true"))
    both["error_mwe_yr"] = both["mb_mwe_yr"] - both["mb_mwe_yr_true"]
    return both[
        [
            "name",
            "glaciers",
            "n_glaciers",
            "area_km2",
            "mb_mwe_yr",
            "mb_mwe_yr_true",
            "error_mwe_yr",
            "mb_sigma_mwe_yr",
            *SIGMA_COLUMNS,
            "mb_mwe_yr_area_weighted",
        ]
    ]


def region_decomposition(glaciers: pd.DataFrame, regions: pd.DataFrame) -> pd.DataFrame:
    """Each region row's error split into parts (m w.e./yr) that add up to it exactly.

    The glacier parts (`evaluate`, `decompose`) are combined with the weights of the pipeline's
    area-weighted mean (`mb_mwe_yr_area_weighted`): each measured member glacier's area over
    their sum (w_g). Then

        error = sum_g w_g error_g                   (the glacier parts below)
              + (mb - mb_area_weighted)              `averaging`: what region-level hypsometric
                                                     averaging (`sum_units`) does differently
              + (sum_g w_g mb_true_g - mb_true)      `weights`: unmeasured members, and measured
                                                     areas and membership against the truth's

    and sum_g w_g error_g = ref + pen + scene + void + sampling, split further: reference and
    the glacier's own penetration deviation (`decompose`) on glaciers with (`_x`) and without
    (`_nox`) their own SRTM-X (`XBAND_MIN_SHARE`); `pen_table_x` / `pen_table_nox` the rest of
    penetration (the table's own error, on the same two groups); scene = seasonal + noise +
    scene_rest (datum / ramp residual, unwrapping; white noise of reprojected DEM scenes).
    `unobservable` = ref_nox + pen_dev_nox + seasonal + noise: what no estimator can take from
    the data (without X-band over a glacier, its SRTM-C error and its own penetration cannot be
    told from its change; the seasonal deviation is a glacier-only offset per scene; measurement
    noise). `unobs_nox` = ref_nox + pen_dev_nox + pen_table_nox: everything the reference and
    penetration leave on glaciers without SRTM-X (their penetration's deviation from the table,
    the table's error from few X-band glaciers included). `void`: areas without any elevation
    (void in SRTM-C, no SRTM-X, too far from valid ground to interpolate). `check` = error minus all the parts (0 up to float
    rounding when w_g are the pipeline's weights)."""
    g = glaciers.copy()
    comps = ["ref", "pen", "pen_dev", "scene", "seasonal", "noise", "void"]
    for c in comps:
        g[c] = g[f"{c}_mwe_yr"].fillna(0.0)
    g["sampling"] = g["error_mwe_yr"] - g[["ref", "pen", "scene", "void"]].sum(axis=1)
    g["nox"] = g["x_frac"].fillna(0.0) < XBAND_MIN_SHARE
    rows = []
    for r in regions.to_dict("records"):
        members = g if r["name"] == "all" else g[g["region"] == r["name"]]
        if r["glaciers"] == "no_surge":
            members = members[members["surge"] != 1]
        m = members[np.isfinite(members["mb_mwe_yr"])]
        w = m["area_km2"] / m["area_km2"].sum()
        nox = m["nox"].to_numpy()

        part = functools.partial(_weighted_sum, m, w)
        row = {
            "name": r["name"],
            "glaciers": r["glaciers"],
            "n_measured": len(m),
            "n_nox": int(nox.sum()),
            "area_nox_share": float(w[nox].sum()),
            "ref_x": part("ref", ~nox),
            "ref_nox": part("ref", nox),
            "pen_dev_x": part("pen_dev", ~nox),
            "pen_dev_nox": part("pen_dev", nox),
            "pen_table_x": part("pen", ~nox) - part("pen_dev", ~nox),
            "pen_table_nox": part("pen", nox) - part("pen_dev", nox),
            "seasonal": part("seasonal"),
            "noise": part("noise"),
            "scene_rest": part("scene") - part("seasonal") - part("noise"),
            "void": part("void"),
            "sampling": part("sampling"),
            "averaging": r["mb_mwe_yr"] - r["mb_mwe_yr_area_weighted"],
            "weights": part("mb_mwe_yr_true") - r["mb_mwe_yr_true"],
        }
        row["unobservable"] = row["ref_nox"] + row["pen_dev_nox"] + row["seasonal"] + row["noise"]
        row["unobs_nox"] = row["ref_nox"] + row["pen_dev_nox"] + row["pen_table_nox"]
        row["check"] = r["error_mwe_yr"] - sum(row[k] for k in REGION_PARTS)
        rows.append(row)
    return pd.DataFrame(rows)


def _child(case: Case, work: Path, keep: bool, overrides: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(("ok", run_case(case, work, keep, overrides)))
    except Exception as err:  # reported by the parent with the case's name
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_all(
    cases: list[Case],
    work: Path,
    keep: bool = False,
    overrides: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Each case in a fresh child process (bounded memory), one at a time."""
    work.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    frames = []
    for case in cases:
        done = work / f"{case.name}.glaciers.csv"
        if done.exists():
            frames.append(pd.read_csv(done))
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(case, work, keep, overrides or {}, queue))
        t0 = time.perf_counter()
        proc.start()
        status, payload = queue.get()
        proc.join()
        if status != "ok":
            print(f"{case.name}: FAILED {payload}", flush=True)
            continue
        payload.to_csv(done, index=False)
        frames.append(payload)
        print(f"{case.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.concat(frames, ignore_index=True)


def size_class(area_km2: pd.Series) -> pd.Series:
    labels = pd.Series("", index=area_km2.index)
    for lo, hi, label in SIZE_CLASSES:
        labels[(area_km2 >= lo) & (area_km2 < hi)] = label
    return labels


def summary(glaciers: pd.DataFrame) -> pd.DataFrame:
    """Per kind and size class (and 'all'), over glaciers with > 50 % coverage."""
    g = glaciers[glaciers["coverage_frac"] > 0.5].copy()
    g["size"] = size_class(g["area_km2"])
    g["abs_err"] = g["error_mwe_yr"].abs()
    g["in1"] = g["abs_err"] <= g["mb_sigma_mwe_yr"]
    g["in2"] = g["abs_err"] <= 2 * g["mb_sigma_mwe_yr"]
    rows = []
    if "model" not in g:
        g["model"] = "default"
    for (model, kind), part in g.groupby(["model", "kind"]):
        for label, sub in [("all", part)] + [
            (lab, part[part["size"] == lab]) for *_, lab in SIZE_CLASSES
        ]:
            if sub.empty:
                continue
            rows.append(
                {
                    "model": model,
                    "kind": kind,
                    "size": label,
                    "n": len(sub),
                    "median_abs_err": sub["abs_err"].median(),
                    "rms_err": np.sqrt((sub["error_mwe_yr"] ** 2).mean()),
                    "cover_1sigma": sub["in1"].mean(),
                    "cover_2sigma": sub["in2"].mean(),
                    "median_sigma": sub["mb_sigma_mwe_yr"].median(),
                    "rms_ref": _rms(sub["ref_mwe_yr"]),
                    "rms_pen": _rms(sub["pen_mwe_yr"]),
                    "rms_scene": _rms(sub["scene_mwe_yr"]),
                    "rms_void": _rms(sub["void_mwe_yr"]),
                    "rms_sampling": _rms(sub["sampling_mwe_yr"]),
                    "rms_ref_all_px": _rms(sub["ref_all_mwe_yr"]),
                    "median_sigma_random": sub["sigma_random_mwe_yr"].median(),
                    "median_sigma_pen": sub["sigma_penetration_mwe_yr"].median(),
                    "median_sigma_unmeasured": sub["sigma_unmeasured_mwe_yr"].median()
                    if "sigma_unmeasured_mwe_yr" in sub
                    else np.nan,
                    "rms_z": _rms(sub["error_mwe_yr"] / sub["mb_sigma_mwe_yr"]),
                    **z_by_term(sub),
                }
            )
    return pd.DataFrame(rows)


def z_by_term(rows: pd.DataFrame) -> dict[str, float]:
    """rms of (the error part a term stands for) / (the term): random, penetration (module
    docstring: adjusted glaciers carry their reference error in the penetration term), and the
    share of adjusted glaciers."""
    adj = rows["adjusted"].fillna(0).astype(bool) if "adjusted" in rows else rows["RGIId"].isna()
    ref, pen, scene = rows["ref_mwe_yr"], rows["pen_mwe_yr"], rows["scene_mwe_yr"]
    random_part = np.where(adj, scene, ref + scene)
    pen_part = np.where(adj, ref + pen, pen)
    return {
        "z_random": _rms(pd.Series(random_part / rows["sigma_random_mwe_yr"].to_numpy())),
        "z_penetration": _rms(pd.Series(pen_part / rows["sigma_penetration_mwe_yr"].to_numpy())),
        "adjusted_share": float(adj.mean()),
    }


def _rms(v: pd.Series) -> float:
    v = v.dropna()
    return float(np.sqrt((v**2).mean())) if len(v) else float("nan")


def region_summary(regions: pd.DataFrame) -> pd.DataFrame:
    r = regions.dropna(subset=["error_mwe_yr"]).copy()
    r["abs_err"] = r["error_mwe_yr"].abs()
    r["in1"] = r["abs_err"] <= r["mb_sigma_mwe_yr"]
    r["in2"] = r["abs_err"] <= 2 * r["mb_sigma_mwe_yr"]
    if "model" not in r:
        r["model"] = "default"
    return (
        r.groupby(["model", "kind", "shape", "glaciers"])
        .agg(
            n=("abs_err", "size"),
            median_abs_err=("abs_err", "median"),
            max_abs_err=("abs_err", "max"),
            cover_1sigma=("in1", "mean"),
            cover_2sigma=("in2", "mean"),
            median_sigma=("mb_sigma_mwe_yr", "median"),
        )
        .reset_index()
    )


def region_class(n_glaciers: pd.Series) -> pd.Series:
    labels = pd.Series("", index=n_glaciers.index)
    for lo, hi, label in REGION_SIZES:
        labels[(n_glaciers >= lo) & (n_glaciers < hi)] = label
    return labels


def distinct_rows(regions: pd.DataFrame) -> pd.DataFrame:
    """The region rows without the 'no_surge' rows that hold the same glaciers as their 'all'
    row (no surge-type glacier in the region: the same numbers)."""
    key = ["model", "kind", "shape", "seed", "name"]
    n_all = regions[regions["glaciers"] == "all"].set_index(key)["n_glaciers"]
    same = regions.join(n_all.rename("n_all"), on=key)["n_all"] == regions["n_glaciers"]
    return regions[~((regions["glaciers"] == "no_surge") & same)]


def region_size_summary(
    regions: pd.DataFrame, bar: float = 0.02, by: tuple[str, ...] = ("kind",)
) -> pd.DataFrame:
    """Distinct region rows (default model; `distinct_rows`) per `by` and number of member
    glaciers (REGION_SIZES): median and max abs error, rows above `bar`, within 1 sigma, median
    sigma."""
    r = distinct_rows(regions[regions["model"] == "default"].dropna(subset=["error_mwe_yr"]))
    r = r.copy()
    r["abs_err"] = r["error_mwe_yr"].abs()
    r["n_class"] = region_class(r["n_glaciers"])
    r["over"] = r["abs_err"] > bar
    r["in1"] = r["abs_err"] <= r["mb_sigma_mwe_yr"]
    order = [label for *_, label in REGION_SIZES]
    r["n_class"] = pd.Categorical(r["n_class"], categories=order, ordered=True)
    out = (
        r.groupby([*by, "n_class"], observed=True)
        .agg(
            rows=("abs_err", "size"),
            median_abs_err=("abs_err", "median"),
            max_abs_err=("abs_err", "max"),
            over_bar=("over", "sum"),
            cover_1sigma=("in1", "mean"),
            median_sigma=("mb_sigma_mwe_yr", "median"),
        )
        .reset_index()
    )
    return out.sort_values([*by, "n_class"]).reset_index(drop=True)


def region_rows(regions: pd.DataFrame, bar: float | None = None) -> pd.DataFrame:
    """One line per distinct region row (default model, `distinct_rows`; those with |error| >
    bar when given): size, error, stated sigma, z and the decomposition
    (`region_decomposition`)."""
    r = distinct_rows(regions[regions["model"] == "default"].dropna(subset=["error_mwe_yr"]))
    r = r.copy()
    if bar is not None:
        r = r[r["error_mwe_yr"].abs() > bar]
    r["z"] = r["error_mwe_yr"] / r["mb_sigma_mwe_yr"]
    r["err_minus_unobs"] = r["error_mwe_yr"] - r["unobservable"]
    r["err_minus_unobs_nox"] = r["error_mwe_yr"] - r["unobs_nox"]
    r["err_minus_nox_all"] = r["err_minus_unobs_nox"] - r["seasonal"] - r["noise"] - r["void"]
    columns = [
        "shape",
        "kind",
        "seed",
        "name",
        "glaciers",
        "n_glaciers",
        "n_nox",
        "area_km2",
        "area_nox_share",
        "error_mwe_yr",
        "mb_sigma_mwe_yr",
        "z",
        *REGION_PARTS,
        "unobservable",
        "err_minus_unobs",
        "unobs_nox",
        "err_minus_unobs_nox",
        "err_minus_nox_all",
        "check",
    ]
    return r.sort_values(["n_glaciers", "shape", "kind", "seed"])[columns].reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """A markdown table (floats with 3 decimals; no tabulate dependency)."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/accuracy"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--keep", action="store_true", help="keep the studies and cubes")
    parser.add_argument(
        "--override",
        type=json.loads,
        default={},
        help='study config overrides as JSON, e.g. \'{"corrections": {"outlier_nmad": 10}}\'',
    )
    args = parser.parse_args()
    cases = [Case(k, s, seed) for s in args.shapes for k in args.kinds for seed in args.seeds]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    glaciers = run_all(cases, args.work, args.keep, args.override)
    glaciers.to_csv(args.work / "glaciers.csv", index=False)
    region_files = [args.work / f"{c.name}.regions.csv" for c in cases]
    regions = pd.concat([pd.read_csv(p) for p in region_files if p.exists()], ignore_index=True)
    regions.to_csv(args.work / "regions.csv", index=False)
    pd.set_option("display.width", 200)
    print(
        f"\n{len(cases)} cases, {time.perf_counter() - t0:.0f} s; load avg before {load0}, "
        f"after {os.getloadavg()}"
    )
    for shape, part in glaciers.groupby("shape"):
        print(f"\n### glaciers, {shape} (coverage > 50 %)\n")
        print(markdown(summary(part)))
    print("\n### regions\n")
    print(markdown(region_summary(regions)))
    print("\n### regions by number of glaciers (default model)\n")
    print(markdown(region_size_summary(regions)))
    print(markdown(region_size_summary(regions, by=("kind", "shape"))))
    print("\n### region rows above 0.02, decomposed (default model)\n")
    print(markdown(region_rows(regions, bar=0.02)))
    region_rows(regions).to_csv(args.work / "region_rows.csv", index=False)


if __name__ == "__main__":
    main()
