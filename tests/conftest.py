"""Shared fixtures: small synthetic studies and their cubes, made once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import pytest

from mbcube.ingest import ingest
from mbcube.synth import generate_study
from tests.slurm import slurm  # noqa: F401  (the session's single-node SLURM, see cluster/)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny insar study (320 x 320 px, 12 glaciers, 3 scenes, one in another CRS). Read-only."""
    return generate_study(tmp_path_factory.mktemp("tiny") / "study", "tiny")


@pytest.fixture(scope="session")
def tiny_dem_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study with DEM-kind scenes. Read-only."""
    return generate_study(tmp_path_factory.mktemp("tiny_dem") / "study", "tiny", kind="dem", seed=2)


@pytest.fixture(scope="session")
def tiny_cube(tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study ingested. Read-only."""
    store = tmp_path_factory.mktemp("tiny_cube") / "cube.zarr"
    ingest(tiny_study, store)
    return store


@pytest.fixture
def study_copy(tmp_path: Path) -> Callable[[Path], Path]:
    """A writable copy of a study folder, for tests that change it."""

    def copy(study: Path) -> Path:
        return Path(shutil.copytree(study, tmp_path / "study"))

    return copy


class ComputeRaised(AssertionError):
    """Something was computed where only a graph should have been built."""


@contextmanager
def raise_if_dask_computes() -> Iterator[None]:
    """Fail if anything is computed with dask inside the block (graph building must be free)."""

    def scheduler(dsk: object, keys: object, **kwargs: object) -> None:
        raise ComputeRaised("dask computed something while building a graph")

    with dask.config.set(scheduler=scheduler):
        yield
