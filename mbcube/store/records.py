"""Step records: what each step did, per scene or for the whole store, and what it wrote.

A record holds what a step's result depends on (its parameters, the tokens of its inputs'
records; JSON), a `token` that changes each time the step rewrites its item, and `outputs`: the
manifest of the files it wrote (store-relative path -> size in bytes), listed once its writes
finished. Downstream steps name the token of their input's record, so a rewrite upstream
redoes what follows; `is_current` also checks the manifest, so an output that lost a file is
redone rather than trusted.

Where they live (the `records` group, read without xarray):
- per-scene items: `records/<step>`, a string array along the cube's `scene` dimension with one
  chunk per scene (writing one record writes one small file, whatever the number of scenes);
- whole-store items (names starting with "_", e.g. the static layers or the penetration
  table): the attributes of the `records` group.

The order that makes a kill at any moment safe: `invalidate` before a step overwrites an
item's outputs, `record_step` after its last byte is written. A killed step leaves no record, so
the next run redoes the item instead of trusting half-written outputs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from mbcube.errors import StoreDamaged, StoreError

log = logging.getLogger(__name__)

RECORDS_GROUP = "records"
#: Items whose name starts with this are whole-store items, not scenes.
WHOLE = "_"
#: Keys of a record that describe the run, not what its result depends on (`run`: facts a step
#: keeps for later, e.g. the inputs' modification times or a scene's coverage).
RUN_KEYS = ("token", "outputs", "recorded_utc", "run")
#: The ingest's record of the static layers.
STATIC_ITEM = "_static"
#: Files zarr writes first and renames into place (left behind by a kill, never data).
TEMPORARY_SUFFIX = ".partial"

Manifest = dict[str, dict[str, int]]


def step_record(path: Path, step: str, item: str) -> dict[str, Any]:
    """What `step` recorded when it last finished `item` (a scene id, or a whole-store item
    starting with "_"); {} if never, or since invalidated."""
    path = Path(path)
    if item.startswith(WHOLE):
        return dict(_whole_records(path).get(f"{step}/{item}", {}))
    index = _scene_index(path).get(item)
    array = _open_array(path, step)
    if index is None or array is None or index >= array.shape[0]:
        return {}
    return _parse(_read_one(array, index))


def step_records(path: Path, step: str) -> dict[str, dict[str, Any]]:
    """Every scene's record of `step`, by scene id (scenes without one are left out)."""
    path = Path(path)
    array = _open_array(path, step)
    if array is None:
        return {}
    try:
        raw = [str(r) for r in np.asarray(array[:]).ravel()]
    except ValueError:  # a damaged record: read them one by one
        raw = [_read_one(array, i) for i in range(array.shape[0])]
    found = {}
    for scene_id, index in _scene_index(path).items():
        if index < len(raw) and raw[index]:
            found[scene_id] = _parse(raw[index])
    return found


def damaged_records(path: Path, step: str) -> list[int]:
    """The scene indices whose record of `step` does not decode (checksum) or parse."""
    array = _open_array(Path(path), step)
    if array is None:
        return []
    bad = []
    for i in range(array.shape[0]):
        try:
            raw = str(array[i])
            json.loads(raw) if raw else None
        except ValueError:
            bad.append(i)
    return bad


def whole_records(path: Path) -> dict[str, dict[str, Any]]:
    """Every whole-store record, by "step/item"."""
    return _whole_records(Path(path))


def record_step(
    path: Path,
    step: str,
    item: str,
    record: dict[str, Any],
    outputs: Iterable[str] = (),
    run: dict[str, Any] | None = None,
) -> str:
    """Record that `step` finished `item` with `record` (JSON-able: parameters and input
    tokens) and wrote the files under `outputs` (store-relative paths: an array's chunks of one
    scene such as "dh_m/c/3", or a whole group); `run`: facts kept with the record but not
    compared by `is_current`. Returns the new token. Call it only after all the item's writes
    finished."""
    path = Path(path)
    token = uuid.uuid4().hex
    full = dict(record) | {
        "token": token,
        "recorded_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "outputs": list_outputs(path, outputs),
        "run": run or {},
    }
    _write(path, step, item, json.dumps(full, sort_keys=True))
    return token


def invalidate(path: Path, step: str, item: str) -> None:
    """Forget `step`'s record of `item` (before its outputs are overwritten or removed)."""
    _write(Path(path), step, item, "")


def is_current(path: Path, step: str, item: str, record: dict[str, Any]) -> bool:
    """True when `step` finished `item` with exactly this record and every file it wrote is
    still there with its recorded size (skip it); False means: (re)compute it."""
    done = step_record(path, step, item)
    if not done or _depends(done) != _depends(record):
        return False
    return not damaged_outputs(Path(path), done.get("outputs", {}))


def list_outputs(path: Path, prefixes: Iterable[str]) -> Manifest:
    """The files under each store-relative prefix (a file or a folder): relative name -> size
    (bytes). zarr's temporary files are left out; a missing prefix lists as {}."""
    manifest: Manifest = {}
    for prefix in prefixes:
        root = Path(path) / prefix
        files: dict[str, int] = {}
        if root.is_file():
            files[""] = root.stat().st_size
        elif root.is_dir():
            for folder, _, names in os.walk(root):
                for name in names:
                    if name.endswith(TEMPORARY_SUFFIX):
                        continue
                    full = os.path.join(folder, name)
                    files[os.path.relpath(full, root)] = os.path.getsize(full)
        manifest[prefix] = files
    return manifest


def damaged_outputs(path: Path, manifest: Manifest) -> list[str]:
    """The recorded files that are missing or changed size (store-relative paths)."""
    damaged = []
    for prefix, files in manifest.items():
        found = list_outputs(path, [prefix])[prefix]
        for name, size in files.items():
            if found.get(name) != size:
                damaged.append(str(Path(prefix) / name) if name else prefix)
    return damaged


def require_intact(path: Path, step: str, item: str, fix: str) -> None:
    """Refuse to read what `step` wrote for `item` when files it recorded are missing or
    changed size (a missing chunk reads as fill values: other numbers, silently). `fix`: the
    command that redoes it."""
    damaged = damaged_outputs(Path(path), step_record(path, step, item).get("outputs", {}))
    if damaged:
        what = f"scene {item}" if not item.startswith(WHOLE) else item[1:]
        raise StoreDamaged(
            f"{path}: {len(damaged)} file(s) that step '{step}' wrote for {what} are missing or "
            f"changed ({damaged[0]}{', ...' if len(damaged) > 1 else ''}). Repair: {fix}."
        )


def require_static_intact(path: Path) -> None:
    """Refuse to read the static layers when files the ingest recorded for them are gone."""
    fix = f"`mbcube verify {path} --repair`, then `mbcube ingest STUDY --store {path}`"
    require_intact(path, "ingest", STATIC_ITEM, fix)


def scene_outputs(names: Sequence[str], index: int) -> list[str]:
    """The store-relative prefixes of scene `index`'s chunks in arrays `names` (arrays whose
    first dimension is `scene`, chunked one scene at a time)."""
    return [f"{name}/c/{index}" for name in names]


def steps_recorded(path: Path) -> list[str]:
    """The steps that have a per-scene records array."""
    group = Path(path) / RECORDS_GROUP
    if not group.is_dir():
        return []
    return sorted(p.name for p in group.iterdir() if (p / "zarr.json").is_file())


# ------------------------------------------------------------------ storage


def _depends(record: dict[str, Any]) -> Any:
    """The part of a record its result depends on, JSON-normalised for comparison."""
    return json.loads(json.dumps({k: v for k, v in record.items() if k not in RUN_KEYS}))


def _read_one(array: Any, index: int) -> str:
    """One scene's raw record; "" (none: the item is redone) when its chunk does not decode."""
    try:
        return str(array[index])
    except ValueError as err:  # zarr's checksum or codec error
        log.warning("%s: the record of scene %d does not decode (%s): redone", array, index, err)
        return ""


def _parse(raw: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        found = json.loads(raw)
    except json.JSONDecodeError:
        return {}  # a damaged record counts as none: the item is redone
    return found if isinstance(found, dict) else {}


def _scene_index(path: Path) -> dict[str, int]:
    try:
        ids = zarr.open_array(str(path / "scene"), mode="r")[:]
    except FileNotFoundError:
        return {}
    return {str(s): i for i, s in enumerate(np.asarray(ids).ravel())}


def _open_array(path: Path, step: str, mode: Literal["r", "r+"] = "r") -> Any:
    where = path / RECORDS_GROUP / step
    if not (where / "zarr.json").is_file():
        return None
    return zarr.open_array(str(where), mode=mode)


def _whole_records(path: Path) -> dict[str, Any]:
    meta = path / RECORDS_GROUP / "zarr.json"
    try:
        found = json.loads(meta.read_text()).get("attributes", {})
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{meta}: not valid JSON ({err}): the store's records are damaged."
        ) from err
    return found if isinstance(found, dict) else {}


def _write(path: Path, step: str, item: str, raw: str) -> None:
    if item.startswith(WHOLE):
        group = zarr.open_group(str(path / RECORDS_GROUP), mode="a", zarr_format=3)
        key = f"{step}/{item}"
        if raw:
            group.attrs[key] = json.loads(raw)
        elif key in group.attrs:
            del group.attrs[key]
        return
    index = _scene_index(path).get(item)
    if index is None:
        raise StoreError(f"{path}: no scene {item!r} in the cube to record step {step!r} for.")
    n_scenes = len(_scene_index(path))
    array = _open_array(path, step, mode="r+")
    if array is None:
        if not raw:
            return
        zarr.open_group(str(path / RECORDS_GROUP), mode="a", zarr_format=3)
        array = zarr.create_array(
            store=str(path / RECORDS_GROUP / step),
            shape=(n_scenes,),
            chunks=(1,),
            dtype=str,
            fill_value="",
            compressors=[Crc32cCodec()],
            dimension_names=["scene"],
            attributes={"long_name": f"record of step {step} per scene (JSON)"},
        )
    elif array.shape[0] < n_scenes:
        array.resize((n_scenes,))
    array[index] = raw
