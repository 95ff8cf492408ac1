"""Spark's storage-level names as the JVM reads them.

pyspark's ``StorageLevel`` attributes are Python's view: they lack the ``*_SER`` names, add
``MEMORY_AND_DISK_DESER``, and mark every level serialized. Spark's ALS validates the level
params with the JVM's ``StorageLevel.fromString`` and caches its factors at that exact level
(``MEMORY_AND_DISK`` is deserialized there), so we use the JVM's table.
"""

from __future__ import annotations

from typing import Dict, Optional

from pyspark import StorageLevel

# name -> (useDisk, useMemory, useOffHeap, deserialized, replication), as StorageLevel.fromString.
_SPARK_LEVELS: Dict[str, StorageLevel] = {
    "DISK_ONLY": StorageLevel(True, False, False, False, 1),
    "DISK_ONLY_2": StorageLevel(True, False, False, False, 2),
    "DISK_ONLY_3": StorageLevel(True, False, False, False, 3),
    "MEMORY_ONLY": StorageLevel(False, True, False, True, 1),
    "MEMORY_ONLY_2": StorageLevel(False, True, False, True, 2),
    "MEMORY_ONLY_SER": StorageLevel(False, True, False, False, 1),
    "MEMORY_ONLY_SER_2": StorageLevel(False, True, False, False, 2),
    "MEMORY_AND_DISK": StorageLevel(True, True, False, True, 1),
    "MEMORY_AND_DISK_2": StorageLevel(True, True, False, True, 2),
    "MEMORY_AND_DISK_SER": StorageLevel(True, True, False, False, 1),
    "MEMORY_AND_DISK_SER_2": StorageLevel(True, True, False, False, 2),
    "OFF_HEAP": StorageLevel(True, True, True, False, 1),
}


def is_storage_level(name: object) -> bool:
    """Whether Spark's ``StorageLevel.fromString`` accepts ``name`` (case-sensitive, with NONE)."""
    return isinstance(name, str) and (name == "NONE" or name in _SPARK_LEVELS)


def storage_level(name: str) -> Optional[StorageLevel]:
    """The level Spark caches at for ``name``; ``None`` for NONE (do not cache)."""
    if name == "NONE":
        return None
    return _SPARK_LEVELS[name]
