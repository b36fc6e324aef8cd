"""Operation discovery: the built-in operations in this package, and those other packages
register in the ``labvault.operations`` entry-point group. A plug-in that cannot be loaded
is logged and skipped; it never stops the service."""
from __future__ import annotations

import logging
from importlib import metadata as importlib_metadata

from common.registry import load
from stats_service.operations.base import Operation

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "labvault.operations"
BUILTIN = (
    "stats_service.operations.anndata_qc:AnnDataQC",
    "stats_service.operations.table_stats:TableStats",
    "stats_service.operations.project_figures:ProjectFigures",
    "stats_service.operations.computed:ProjectZip",
    "stats_service.operations.computed:SampleZip",
    "stats_service.operations.computed:MetadataZip",
    "stats_service.operations.computed:MergedAnnData",
)


def discover() -> dict[str, Operation]:
    """Every loadable operation by name; built-in ones win a name clash."""
    found: dict[str, Operation] = {}
    candidates = [(reference, lambda reference=reference: load(reference)) for reference in BUILTIN]
    candidates += [(f"{entry.name} ({entry.value})", entry.load)
                   for entry in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for label, loader in candidates:
        try:
            cls = loader()
            operation = cls() if isinstance(cls, type) else cls
            if not isinstance(operation, Operation) or not operation.name:
                raise TypeError("not an Operation subclass with a name")
        except Exception:  # noqa: BLE001 - a broken plug-in is skipped, never fatal
            logger.exception("operation %s cannot be loaded; skipped", label)
            continue
        if operation.name in found:
            logger.warning("operation %s: the name %r is taken; skipped", label, operation.name)
            continue
        found[operation.name] = operation
    return found
