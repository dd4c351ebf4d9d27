"""Keeping Python's garbage collector from pausing the event loop.

A node imports torch and transformers and may load models at start: some 350,000
long-lived objects that the collector's full (generation 2) passes scan every time,
measured at 150-250 ms a pass on the CI machine, during which no stream gets a token.
Those objects are never garbage, so once the node has started they are collected once
and then frozen out of the collector's sight (`gc.freeze`); later full passes scan only
what was allocated since. A model loaded later (on first use, or a preload that finishes
after start) brings its own long-lived objects: the node freezes again once it is loaded,
a one-off full pass at a moment that already costs seconds.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collects what start-up left as garbage, then freezes the rest. Returns how many
    objects the collector no longer scans."""
    frozen = _collect_and_freeze()
    log.debug("froze %d start-up objects out of the garbage collector's passes", frozen)
    return frozen


def freeze_after_loading(model: str) -> None:
    """The same for a model that finished loading: its weights' and modules' objects."""
    before = gc.get_freeze_count()
    log.debug("froze %d more objects after loading %s", _collect_and_freeze() - before, model)


def _collect_and_freeze() -> int:
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
