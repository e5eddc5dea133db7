"""Shared fixtures: small synthetic studies and their cubes, made once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import pytest

from mbcube.ingest import ingest
from mbcube.pipeline import Pipeline
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


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A small DEM-kind study (no unwrapping: 3 scenes, 6 glaciers, 192 x 192 px in 9 tiles)
    run once to the end on dask's threads. Read-only: copy it (`tests.storetools.copy_run`)."""
    import warnings

    from mbcube.errors import MbcubeWarning
    from mbcube.pipeline import load_pipeline, run

    root = tmp_path_factory.mktemp("small_run")
    study = generate_study(
        root / "study", "tiny", kind="dem", size_px=192, tile_px=64, n_glaciers=6, seed=5
    )
    pipeline = load_pipeline(study, cluster="threads")
    with warnings.catch_warnings():  # too little X band for a table per region and surface
        warnings.filterwarnings("ignore", "penetration", MbcubeWarning)
        run(pipeline)
    return pipeline


@pytest.fixture(scope="session")
def tongues_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tongues` study (10 glaciers, tongues thinned beyond h_amb / 2 at the outline, 30 %
    surge-type). Read-only."""
    return generate_study(tmp_path_factory.mktemp("tongues") / "study", "tongues")


def _run_tongues(study: Path, root: Path, repair: str) -> Pipeline:
    import warnings

    from mbcube.errors import MbcubeWarning
    from mbcube.pipeline import run

    pipeline = Pipeline(
        study=study,
        store=root / "cube.zarr",
        out=root / "out",
        cluster="threads",
        overrides={"unwrap": {"repair": repair}},
    )
    with warnings.catch_warnings():  # small regions: the penetration table pools (a warning)
        warnings.simplefilter("ignore", MbcubeWarning)
        run(pipeline)
    return pipeline


@pytest.fixture(scope="session")
def tongues_plain(tongues_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tongues study run to the end without repair (`unwrap.repair: none`): slipped
    tongues stay in doubt. Read-only."""
    return _run_tongues(tongues_study, tmp_path_factory.mktemp("tongues_none"), "none")


@pytest.fixture(scope="session")
def tongues_repaired(tongues_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tongues study run to the end with the data prior (the default). Read-only."""
    return _run_tongues(tongues_study, tmp_path_factory.mktemp("tongues_data"), "data")


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
