"""Errors of the stats domain: an input file the statistics cannot be computed from.

A 422: the request was well formed, but the file it names is not what the operation
reads. The message is one line and never names a server path.
"""
from __future__ import annotations

from common.errors import LabvaultError

NOT_HDF5 = "not_hdf5"
TRUNCATED_FILE = "truncated_file"
MISSING_MATRIX = "missing_matrix"
INVALID_MATRIX = "invalid_matrix"
INVALID_TABLE = "invalid_table"
FIGURE_FAILED = "figure_failed"


class StatsInputError(LabvaultError):
    """The input file cannot be read as the operation expects; ``code`` says why."""

    status, code = 422, "invalid_input"
