"""Helpers for tests that change a store's data on purpose to build a case."""

from __future__ import annotations

from pathlib import Path

from mbcube.store import RUN_KEYS, record_step, step_record


def rerecord(store: Path, step: str, item: str) -> None:
    """Record again what `step` wrote for `item` as it is now (after a test changed it on purpose:
    otherwise the store counts the change as damage)."""
    record = step_record(store, step, item)
    kept = {k: v for k, v in record.items() if k not in RUN_KEYS}
    record_step(store, step, item, kept, outputs=list(record["outputs"]), run=record.get("run"))
