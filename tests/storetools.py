"""Helpers for tests of stores: copies of a finished run, table comparisons, and recording again
what a test changed on purpose."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from mbcube.pipeline import Pipeline, load_pipeline
from mbcube.store import RUN_KEYS, record_step, step_record

TABLES = ("glaciers.csv", "regions.csv")


def copy_run(run: Pipeline, where: Path, store: bool = True) -> Pipeline:
    """The run's study (and its store) copied into `where`: a moved study with its cube; the
    results go to where/results."""
    study = Path(shutil.copytree(run.study, where / "study"))
    if store:
        shutil.copytree(run.store, where / "cube.zarr")
    return load_pipeline(study, store=where / "cube.zarr", cluster="threads")


def same_tables(out: Path, reference: Path) -> None:
    """The glacier and region tables in `out` equal those in `reference`."""
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(reference / name))


def rerecord(store: Path, step: str, item: str) -> None:
    """Record again what `step` wrote for `item` as it is now (after a test changed it on purpose:
    otherwise the store counts the change as damage)."""
    record = step_record(store, step, item)
    kept = {k: v for k, v in record.items() if k not in RUN_KEYS}
    record_step(store, step, item, kept, outputs=list(record["outputs"]), run=record.get("run"))
