"""The cube store: every read and write of the cube's arrays, state and step records, the
writer's lock, where a store may live, and its integrity checks.

- `cube`: open the cube, create variables, write regions (checksummed chunks), grow scenes;
- `state`: the store-level state (schema, grid, study parameters) in the root attributes;
- `records`: what each step did per scene or for the whole store, with the manifest of what
  it wrote (invalidated before outputs are overwritten, recorded after);
- `lock`: one writer per store;
- `location`: never create a cube over what mbcube did not make, nor among the inputs;
- `verify`: check every recorded output (present, same size, decodes) and repair.
"""

from mbcube.store.cube import (
    OUTLIER_GROUP,
    SCENE_INGESTED,
    SCENE_PENDING,
    SCENE_REMOVED,
    checked_codecs,
    consolidate,
    delete_scene_chunks,
    ensure_variables,
    extend_scene_dim,
    open_cube,
    outlier_group_name,
    scene_index,
    scene_states,
    size_on_disk_bytes,
    static_arrays,
    write_dataset,
    write_scene_region,
)
from mbcube.store.lock import holds_lock, writer_lock, writes_store
from mbcube.store.records import (
    RUN_KEYS,
    STATIC_ITEM,
    damaged_outputs,
    invalidate,
    is_current,
    list_outputs,
    record_step,
    require_intact,
    require_static_intact,
    scene_outputs,
    step_record,
    step_records,
    steps_recorded,
    whole_records,
)
from mbcube.store.state import (
    SCHEMA_VERSION,
    check_schema,
    grid_of,
    is_cube,
    read_state,
    recorded_config,
    store_exists,
    write_state,
)

__all__ = [
    "OUTLIER_GROUP",
    "RUN_KEYS",
    "SCENE_INGESTED",
    "SCENE_PENDING",
    "SCENE_REMOVED",
    "SCHEMA_VERSION",
    "STATIC_ITEM",
    "check_schema",
    "checked_codecs",
    "consolidate",
    "damaged_outputs",
    "delete_scene_chunks",
    "ensure_variables",
    "extend_scene_dim",
    "grid_of",
    "holds_lock",
    "invalidate",
    "is_cube",
    "is_current",
    "list_outputs",
    "open_cube",
    "outlier_group_name",
    "read_state",
    "record_step",
    "recorded_config",
    "require_intact",
    "require_static_intact",
    "scene_index",
    "scene_outputs",
    "scene_states",
    "size_on_disk_bytes",
    "static_arrays",
    "step_record",
    "step_records",
    "steps_recorded",
    "store_exists",
    "whole_records",
    "write_dataset",
    "write_scene_region",
    "write_state",
    "writer_lock",
    "writes_store",
]
