"""`mbcube run`: every step from study to tables, figures and report, each skipped when up to date.

A run is described by a study folder, or by a pipeline file (YAML) naming the study, the store,
the output folder, the cluster profile and parameter overrides:

    study: ../stores/demo/study      # paths relative to this file
    store: ../stores/demo/cube.zarr
    out: ../stores/demo/results
    cluster: local                   # a profile of cluster/, or 'threads' (no cluster)
    config:                          # merged over the study's study.yaml
      massbalance: {density_kg_m3: 900}

Steps (each records its parameters and its inputs' tokens in the store, see `mbcube.store`):
ingest -> unwrap (insar scenes) -> correct -> bin -> aggregate (tables) -> report (figures).
The pixel steps work per scene; aggregate and report work on the small stored statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from mbcube.binning import bin_cube
from mbcube.config import read_yaml
from mbcube.corrections.step import correct_cube
from mbcube.errors import StudyError
from mbcube.fingerprints import fingerprint, identity
from mbcube.ingest import ingest
from mbcube.preflight import check_run
from mbcube.store import (
    invalidate,
    is_current,
    open_cube,
    record_step,
    recorded_config,
    step_record,
    step_records,
    writer_lock,
)
from mbcube.store.location import RESULTS_MARKER
from mbcube.study import Study
from mbcube.unwrap.step import unwrap_cube

log = logging.getLogger(__name__)

#: The record key of whole-store steps (not per scene).
ALL = "_all"
#: What the ingest's entry of a run report says when it wrote the static layers again.
STATIC = "static layers"
#: The tables aggregate writes into the output folder (recorded, so that a lost or changed one
#: is written again by the next run).
TABLE_FILES = (
    "glaciers.csv",
    "glaciers.parquet",
    "glaciers.gpkg",
    "regions.csv",
    "regions.parquet",
    "region_members.csv",
    RESULTS_MARKER,
)


class CubeStep(Protocol):
    """A pixel step on the cube: (re)computes the scenes not up to date, returns their ids."""

    def __call__(
        self,
        store: Path,
        /,
        *,
        scenes: Sequence[str] | None = None,
        force: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> list[str]: ...


#: The pixel steps in order (each module imports its heavy dependencies itself).
STEPS: dict[str, CubeStep] = {
    "unwrap": unwrap_cube,
    "correct": correct_cube,
    "bin": bin_cube,
}


class PipelineFile(BaseModel):
    """What a pipeline YAML file may hold (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    study: Path
    store: Path | None = None
    out: Path | None = None
    cluster: str | None = None
    regions: Path | None = None
    config: dict[str, Any] = {}


@dataclass(frozen=True)
class Pipeline:
    """A resolved run: study folder, cube store, output folder, cluster profile, overrides."""

    study: Path
    store: Path
    out: Path
    cluster: str = "local"
    regions: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def load_pipeline(
    source: Path | str,
    *,
    store: Path | str | None = None,
    out: Path | str | None = None,
    cluster: str | None = None,
) -> Pipeline:
    """A run from a study folder or a pipeline YAML file; arguments given here win.

    Defaults for a study folder STUDY: store STUDY/../cube.zarr, out STUDY/../results.
    """
    source = Path(source)
    store = Path(store) if store is not None else None
    out = Path(out) if out is not None else None
    if source.is_dir():
        spec = PipelineFile(study=source.resolve())
        base = source.parent
    elif source.suffix in (".yaml", ".yml") and source.exists():
        raw = read_yaml(source) or {}
        try:
            spec = PipelineFile.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(
                f"key '{'.'.join(str(p) for p in e['loc'])}': {' '.join(e['msg'].split())}"
                for e in err.errors()
            )
            raise StudyError(f"{source}: not a valid pipeline file: {problems}.") from err
        base = source.parent
    else:
        raise StudyError(
            f"{source}: neither a study folder nor a pipeline .yaml file. "
            "Pass the folder holding scenes.csv, or a file of pipelines/."
        )

    def resolve(path: Path | None, default: Path | None) -> Path | None:
        if path is None:
            return default
        return path if path.is_absolute() else (base / path).resolve()

    study = resolve(spec.study, None)
    if study is None:  # the model requires it; this keeps the types exact
        raise StudyError(f"{source}: key 'study' missing.")
    return Pipeline(
        study=study,
        store=store or resolve(spec.store, study.parent / "cube.zarr") or study,
        out=out or resolve(spec.out, study.parent / "results") or study,
        cluster=cluster or spec.cluster or "local",
        regions=resolve(spec.regions, None),
        overrides=spec.config,
    )


@dataclass
class RunReport:
    """What a run did: per step, the scenes (or ALL) it recomputed, and its wall time (s)."""

    recomputed: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    out: Path | None = None

    @property
    def nothing_recomputed(self) -> bool:
        return not any(self.recomputed.values())


def run(
    pipeline: Pipeline,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RunReport:
    """Run every step of `pipeline`; each step skips what is up to date (unless force).

    Everything is checked first (`mbcube.preflight.check_run`: the study, the store, the output
    folder, the disk); then the store's writer lock is held for the whole run."""
    study = check_run(pipeline.study, pipeline.store, pipeline.out, pipeline.overrides)
    with writer_lock(pipeline.store):
        return _run(pipeline, study, force, progress or log.info)


def _run(pipeline: Pipeline, study: Study, force: bool, say: Callable[[str], None]) -> RunReport:
    from mbcube.aggregate import aggregate

    report = RunReport(out=pipeline.out)
    store = pipeline.store
    with cluster_context(pipeline.cluster):
        with _step(report, "ingest", say):
            done = ingest(study, store, progress=say)
            static = [STATIC] if done.static_written and not done.created else []
            report.recomputed["ingest"] = static + done.recomputed + done.removed
        for name, step in STEPS.items():
            with _step(report, name, say):
                report.recomputed[name] = step(store, force=force, progress=say)

    records = step_records(store, "bin")
    upstream = {s: records.get(s, {}).get("token") for s in _scene_ids(store)}
    regions = {}
    if pipeline.regions:
        regions = {
            "regions": identity({"file": fingerprint(pipeline.regions, pipeline.regions.parent)})
        }
    config = recorded_config(store)
    tables = {
        "params": config.model_dump(mode="json", include={"massbalance", "glacier_id_column"}),
        "upstream": upstream,
        "out": str(pipeline.out),
    } | regions
    out = pipeline.out.resolve()
    with _step(report, "aggregate", say):
        if force or not is_current(store, "aggregate", ALL, tables):
            invalidate(store, "aggregate", ALL)
            aggregate(store, pipeline.out, regions=pipeline.regions)
            tables_written = [str(p) for p in sorted(out.iterdir()) if p.name in TABLE_FILES]
            token = record_step(store, "aggregate", ALL, tables, outputs=tables_written)
            report.recomputed["aggregate"] = [ALL]
        else:
            token = step_record(store, "aggregate", ALL)["token"]
            report.recomputed["aggregate"] = []

    with _step(report, "report", say):
        study_config = config.model_dump(mode="json", include={"name", "reference_date"})
        figures = {"upstream": token, "out": str(pipeline.out), "study": study_config}
        if force or not is_current(store, "report", ALL, figures):
            from mbcube.figures import FIGURES_RECORD, make_figures
            from mbcube.report import write_report

            invalidate(store, "report", ALL)
            made = make_figures(store, pipeline.out, pipeline.out / "figures")
            write_report(store, pipeline.out, pipeline.out)
            names = [*(p.name for p in made), FIGURES_RECORD]
            files = [*(out / "figures" / n for n in names), out / "report.html"]
            record_step(store, "report", ALL, figures, outputs=[str(p) for p in files])
            report.recomputed["report"] = [ALL]
        else:
            report.recomputed["report"] = []
    return report


def cluster_context(profile: str) -> Any:
    """The dask scheduler for the pixel steps: a cluster profile, or 'threads' (dask's default
    threaded scheduler in this process, no cluster)."""
    if profile == "threads":
        return nullcontext()
    from mbcube.cluster import cluster_client

    return cluster_client(profile)


def _scene_ids(store: Path) -> list[str]:
    return [str(s) for s in open_cube(store)["scene"].values]


@contextmanager
def _step(report: RunReport, name: str, say: Callable[[str], None]) -> Iterator[None]:
    start = time.perf_counter()
    say(f"[{name}] ...")
    yield
    report.seconds[name] = time.perf_counter() - start
    work = report.recomputed.get(name, [])
    said = f"{len(work)} recomputed" if work else "up to date"
    say(f"[{name}] {said} ({report.seconds[name]:.1f} s)")
