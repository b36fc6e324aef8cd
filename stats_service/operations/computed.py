"""Computed files (the ScPCA portal's downloads), built as operations: a project's data zip, each
sample's data zip, a metadata-only zip, and a merged AnnData of the project (or of chosen samples).

Zips are byte-identical for identical inputs (``stats_service.packages``), so a rebuild happens
only when a file's digest, the metadata (key/values, the project's title) or the template
version changes: those are the run's cache key. Data members stream from the archive into the
zip and are checked against their stored digests on the way; nothing is fetched whole.
"""
from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from common.errors import UnprocessableEntity
from stats_service import computed
from stats_service.catalog import ANNDATA, FileRecord
from stats_service.computed import MERGED, METADATA_ZIP, PROJECT_ZIP, SAMPLE_ZIP, sample_of
from stats_service.operations.base import Operation
from stats_service.runs import VerifyingReader, canonical


_PROJECT = {"type": "string", "minLength": 1, "maxLength": 255}
_SAMPLE = {"type": "string", "minLength": 1, "maxLength": 255}


def tsv_rows(described: list[dict], key: str) -> list[dict[str, Any]]:
    """``metadata.tsv`` rows: one per file."""
    rows = []
    for entry in described:
        record: FileRecord = entry["record"]
        rows.append({"project": record.project, "sample": sample_of(entry, key), "transaction": record.transaction,
                     "submitter": entry["submitter"], "instrument": entry["instrument"], "path": record.path,
                     "size": record.size, "hashtype": record.hashtype, "hashsum": record.hashsum,
                     "sha256": record.hashsum if record.hashtype == "sha256" else None,
                     "mimetype": record.mimetype, "keys": entry["keys"]})
    return rows


class _Package(Operation):
    """What the zips share: the files they hold, the metadata behind the cache key, registration."""

    kind: ClassVar[str] = ""
    applies_to = ()  # built by the project build, never run per file

    def selected(self, inputs: dict, catalog) -> list[dict]:
        """The described files this package holds."""
        project = inputs["project"]
        if catalog.project(project) is None:
            raise UnprocessableEntity(f"inputs: no project {project[:100]!r}", code="unknown_input")
        described = catalog.describe(catalog.files_of_project(project))
        samples = inputs.get("samples") or ([inputs["sample"]] if "sample" in inputs else None)
        if samples is not None:
            described = [entry for entry in described if sample_of(entry, self.sample_key()) in samples]
        return described

    def sample_key(self) -> str:
        return self.settings.get("downloads", "sample_key", "sample") if self.settings else "sample"

    def finished(self, engine, run) -> None:
        """Register the newest build as the project's (or sample's) computed file of this kind."""
        computed.register(engine, self.kind, run)

    def input_files(self, inputs, catalog):
        return [entry["record"] for entry in self.selected(inputs, catalog)]

    def extra_digests(self, inputs, files, catalog):
        from stats_service import packages
        described = self.selected(inputs, catalog)
        project = catalog.project(inputs["project"]) or {}
        metadata = canonical([tsv_rows(described, self.sample_key()),
                              {k: project.get(k) for k in ("title", "abstract")}])
        return {"metadata": hashlib.sha256(metadata.encode()).hexdigest(), "template": packages.TEMPLATE_VERSION,
                "sample_key": self.sample_key()}

    readme_kind: ClassVar[str] = ""

    def readme_context(self, context, described: list[dict], sample: str | None) -> dict:
        from stats_service import packages
        project = context.catalog.project(context.inputs["project"]) or {}
        # The newest transaction's day, not today: the same inputs must give the same bytes.
        built = max((str(entry.get("created") or "")[:10] for entry in described), default="")
        return {"project_id": context.inputs["project"], "project_title": project.get("title") or "",
                "project_abstract": project.get("abstract") or "", "kind": self.readme_kind or packages.KIND_PROJECT,
                "sample": sample or "", "file_count": len(described) if self.with_data else 0,
                "total_size": sum(entry["record"].size for entry in described) if self.with_data else 0,
                "build_date": built}

    def filename(self, inputs: dict) -> str:
        raise NotImplementedError


class _DataZip(_Package):
    with_data: ClassVar[bool] = True

    def run(self, context):
        from stats_service import packages
        described = self.selected(context.inputs, context.catalog)
        if not described:
            raise UnprocessableEntity("there are no files to package", code="no_inputs")
        key = self.sample_key()
        members = []
        if self.with_data:
            engine = context.engine
            names = packages.unique_names(
                (packages.sample_layout(sample_of(entry, key), entry["record"].subdir, entry["record"].name),
                 entry["record"].transaction, entry["record"].file_id) for entry in described)
            for entry in described:
                record: FileRecord = entry["record"]
                members.append(packages.Member(
                    name=names[record.file_id], size=record.size,
                    open=lambda record=record: VerifyingReader(engine.open_archived(record.file_id), record.size,
                                                               record.hashtype, record.hashsum, record.path)))
        extra = {"metadata.tsv": packages.metadata_tsv(tsv_rows(described, key)),
                 "README.md": packages.readme(self.readme_context(context, described, context.inputs.get("sample")))}
        target = context.path("package.zip")
        listing = packages.write_zip(target, members, extra)
        context.add_output("package.zip", target, "application/zip")
        return {"kind": self.kind, "files": len(described), "members": [name for name, _, _ in listing],
                "filename": self.filename(context.inputs)}


class ProjectZip(_DataZip):
    name = PROJECT_ZIP
    kind = PROJECT_ZIP
    readme_kind = "project"
    description = ("A project's data as one zip: its files laid out <sample>/<subdir>/<name>, metadata.tsv, "
                   "README.md and MANIFEST.sha256.")
    input_schema = {"type": "object", "properties": {"project": _PROJECT}, "required": ["project"],
                    "additionalProperties": False}

    def filename(self, inputs):
        return f"{inputs['project']}_data.zip"


class SampleZip(_DataZip):
    name = SAMPLE_ZIP
    kind = SAMPLE_ZIP
    readme_kind = "sample"
    description = "One sample's data as a zip, laid out and described like the project's."
    input_schema = {"type": "object", "properties": {"project": _PROJECT, "sample": _SAMPLE},
                    "required": ["project", "sample"], "additionalProperties": False}

    def filename(self, inputs):
        return f"{inputs['project']}_{inputs['sample']}_data.zip"


class MetadataZip(_DataZip):
    name = METADATA_ZIP
    kind = METADATA_ZIP
    readme_kind = "metadata"
    with_data = False
    description = "A project's metadata only: metadata.tsv (one row per file) and README.md."
    input_schema = ProjectZip.input_schema

    def filename(self, inputs):
        return f"{inputs['project']}_metadata.zip"


class MergedAnnData(_Package):
    name = MERGED
    kind = MERGED
    description = ("The project's AnnData files (or those of chosen samples) merged into one .h5ad on disk, "
                   "raw counts kept, with obs columns naming each cell's sample and file.")
    input_schema = {"type": "object",
                    "properties": {"project": _PROJECT,
                                   "samples": {"type": "array", "items": _SAMPLE, "minItems": 1, "maxItems": 1000,
                                               "uniqueItems": True}},
                    "required": ["project"], "additionalProperties": False}

    def selected(self, inputs, catalog):
        return [entry for entry in super().selected(inputs, catalog) if entry["record"].kind == ANNDATA]

    def extra_digests(self, inputs, files, catalog):
        digests = super().extra_digests(inputs, files, catalog)
        digests["merge_max_cells"] = str(self.max_cells())
        return digests

    def max_cells(self) -> int:
        return self.settings.getint("downloads", "merge_max_cells", 2_000_000) if self.settings else 2_000_000

    def filename(self, inputs):
        samples = inputs.get("samples")
        return f"{inputs['project']}_{'_'.join(sorted(samples)) + '_' if samples else ''}merged.h5ad"

    def run(self, context):
        from stats_service import merge
        described = self.selected(context.inputs, context.catalog)
        key = self.sample_key()
        try:
            if len(described) < 2:
                raise merge.MergeSkipped("too_few_files", "a merged AnnData needs two or more .h5ad files")
            sources = [(context.fetch(entry["record"]), sample_of(entry, key), entry["record"].path)
                       for entry in described]
            context.progress(40, "files fetched")
            target = context.path("merged.h5ad")
            summary = merge.merge_h5ad(sources, target, self.max_cells(),
                                       progress=lambda f, m: context.progress(40 + 55 * f, m))
        except merge.MergeSkipped as skipped:
            return {"kind": self.kind, "skipped": {"code": skipped.code, "message": str(skipped)},
                    "filename": self.filename(context.inputs)}
        context.add_output("merged.h5ad", target, "application/x-hdf5")
        return {"kind": self.kind, "filename": self.filename(context.inputs), **summary}


COMPUTED = (ProjectZip, SampleZip, MetadataZip, MergedAnnData)
