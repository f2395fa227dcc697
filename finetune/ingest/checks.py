"""The Great Expectations suite over the image index, and running it in the project's GX context.

Images are not a table, so the checks run on three tables derived from the index:

* ``images``: one row per file (decodes, extension, size, aspect ratio, declared pixels, leakage);
  an offending row is a file, named by its path;
* ``classes``: one row per class with its image count in each split (missing folder: null);
* ``splits``: one row per split folder found.

Every threshold comes from ``validate:`` in params.yaml. The suites are rebuilt from it on each
run and saved in the file-backed context (``validate.gx_dir``), whose validation results feed
the Data Docs site at ``validate.docs`` (its index.html is the self-contained page of
finetune/ingest/report_html.py; GX's own index is beside it as gx-index.html).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.core.config import ValidateConfig
from finetune.ingest.index import SPLITS

log = logging.getLogger(__name__)

DATASOURCE = "dataset"
SITE = "local_site"
# The column that names an offending row in each table's results.
KEYS = {"images": "path", "classes": "class", "splits": "split"}
# Checks on single files: in quarantine mode their offending files are left out.
# GX's own Data Docs index, renamed: index.html is the offline page of finetune/ingest/report_html.py.
GX_INDEX = "gx-index.html"
FILE_CHECKS = ("in_class_folder", "decodes", "extension", "min_side", "aspect_ratio", "pixels", "leakage")


@dataclass(frozen=True)
class CheckResult:
    """One expectation's outcome: ``offending`` names the files, classes or splits at fault."""

    check: str
    table: str
    description: str
    severity: str  # "critical" fails validation; "warning" is reported only
    success: bool
    offending: list[str]


def tables(images: pd.DataFrame, class_folders: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
    """The three tables that the suites check, from index rows and the class folders found."""
    images = images.copy()
    images["pixels"] = images["width"] * images["height"]
    images["shorter_side"] = images[["width", "height"]].min(axis=1)
    images["aspect_ratio"] = images[["width", "height"]].max(axis=1) / images["shorter_side"]
    splits_of = images.groupby("sha256")["split"].nunique()
    images["in_both_splits"] = images["sha256"].map(splits_of) > 1
    images["duplicate_in_split"] = images.duplicated(["split", "sha256"], keep=False)
    return {"images": images, "classes": _classes(images, class_folders), "splits": _splits(class_folders)}


def _classes(images: pd.DataFrame, class_folders: dict[str, list[str]]) -> pd.DataFrame:
    names = sorted({name for folders in class_folders.values() for name in folders})
    counts = images.dropna(subset=["class"]).groupby(["class", "split"]).size()
    table = pd.DataFrame({"class": names})
    for split in SPLITS:
        present = set(class_folders.get(split, []))
        table[split] = pd.array([int(counts.get((name, split), 0)) if name in present else None
                                 for name in names], dtype="Int64")
        positive = table[split][table[split] > 0]
        # How many times larger than the split's smallest non-empty class (empty ones fail
        # the minimum-count check already).
        table[f"{split}_balance"] = table[split] / positive.min() if len(positive) else pd.NA
    return table


def _splits(class_folders: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame({"split": list(class_folders),
                         "classes": [len(folders) for folders in class_folders.values()]})


def suites(cfg: ValidateConfig) -> dict[str, list]:
    """The expectations of each table, thresholds from ``cfg``; ``meta.check`` names each one."""
    import great_expectations.expectations as gxe

    splits = [
        _expect(gxe.ExpectColumnDistinctValuesToContainSet, "splits",
                "both split folders, train/ and test/, exist", column="split", value_set=list(SPLITS)),
        _expect(gxe.ExpectColumnValuesToBeBetween, "split_has_classes",
                "every split folder holds class folders", column="classes", min_value=1),
    ]
    return {"images": _image_suite(cfg), "classes": _class_suite(cfg), "splits": splits}


def _expect(kind, check: str, description: str, **kwargs):
    """An expectation of type ``kind`` named ``check`` (in its meta) with a readable description."""
    return kind(description=description, meta={"check": check}, **kwargs)


def _image_suite(cfg: ValidateConfig) -> list:
    """Per-file expectations on the ``images`` table."""
    import great_expectations.expectations as gxe

    expect = _expect
    extensions = list(cfg.extensions)
    return [
        expect(gxe.ExpectColumnValuesToNotBeNull, "in_class_folder",
               "every file lies in a class folder <split>/<class>/", column="class"),
        expect(gxe.ExpectColumnValuesToBeInSet, "decodes",
               "every file decodes completely as an image", column="decodes", value_set=[True]),
        expect(gxe.ExpectColumnValuesToBeInSet, "extension",
               f"file extensions are among {extensions} (validate.extensions)",
               column="ext", value_set=extensions),
        expect(gxe.ExpectColumnValuesToBeBetween, "min_side",
               f"shorter side at least {cfg.min_side} px (validate.min_side)",
               column="shorter_side", min_value=cfg.min_side),
        expect(gxe.ExpectColumnValuesToBeBetween, "aspect_ratio",
               f"aspect ratio at most {cfg.max_aspect_ratio} (validate.max_aspect_ratio)",
               column="aspect_ratio", max_value=cfg.max_aspect_ratio),
        expect(gxe.ExpectColumnValuesToBeBetween, "pixels",
               f"declared size at most {cfg.max_pixels} pixels (validate.max_pixels)",
               column="pixels", max_value=cfg.max_pixels),
        expect(gxe.ExpectColumnValuesToBeInSet, "leakage",
               "no identical file (sha256) in both train and test (leakage)",
               column="in_both_splits", value_set=[False]),
        expect(gxe.ExpectColumnValuesToBeInSet, "duplicates", "no identical files inside a split",
               column="duplicate_in_split", value_set=[False], severity="warning"),
    ]


def _class_suite(cfg: ValidateConfig) -> list:
    """Per-class expectations on the ``classes`` table (counts per split, balance)."""
    import great_expectations.expectations as gxe

    expect = _expect
    classes = [expect(gxe.ExpectTableRowCountToBeBetween, "class_count",
                      f"at least {cfg.min_classes} classes (validate.min_classes)",
                      min_value=cfg.min_classes)]
    for split in SPLITS:
        classes += [
            expect(gxe.ExpectColumnValuesToNotBeNull, f"{split}_has_class",
                   f"every class has a {split} folder (train and test have the same classes)",
                   column=split),
            expect(gxe.ExpectColumnValuesToBeBetween, f"{split}_min_images",
                   f"at least {cfg.min_images_per_class} {split} images per class "
                   "(validate.min_images_per_class)", column=split, min_value=cfg.min_images_per_class),
            expect(gxe.ExpectColumnValuesToBeBetween, f"{split}_balance",
                   f"{split}: no class more than {cfg.max_class_ratio}x the smallest "
                   "(validate.max_class_ratio)", column=f"{split}_balance", max_value=cfg.max_class_ratio),
        ]
        if cfg.expected_per_class is not None:
            expected = getattr(cfg.expected_per_class, split)
            classes.append(expect(gxe.ExpectColumnValuesToBeBetween, f"{split}_expected_count",
                                  f"exactly {expected} {split} images per class (validate.expected_per_class)",
                                  column=split, min_value=expected, max_value=expected, severity="warning"))
    return classes


def run_suites(cfg: ValidateConfig, tables_: dict[str, pd.DataFrame], context, run_name: str) -> list[CheckResult]:
    """Validate each table against its suite in ``context`` (see open_context); the results are
    stored there for Data Docs."""
    import great_expectations as gx

    datasource = _datasource(context)
    results = []
    for table, expectations in suites(cfg).items():
        suite = _saved_suite(context, table, expectations)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=table, data=_batch_definition(datasource, table), suite=suite))
        outcome = definition.run(
            batch_parameters={"dataframe": tables_[table]},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [KEYS[table]]},
            run_id=gx.core.run_identifier.RunIdentifier(run_name=run_name),
        )
        results += [_result(table, item) for item in outcome.results]
    return results


def build_docs(cfg: ValidateConfig, context, workdir: Path) -> Path:
    """Rebuild the Data Docs site from every stored validation; return its folder.

    GX's index lists the validations with scripts from CDNs (blank offline): it moves to
    GX_INDEX, and index.html is left to the self-contained page (finetune/ingest/report_html.py).
    """
    context.build_data_docs(site_names=[SITE])
    folder = (workdir / cfg.docs).resolve()
    if (folder / "index.html").exists():
        os.replace(folder / "index.html", folder / GX_INDEX)
    return folder


def open_context(cfg: ValidateConfig, workdir: Path):
    """The file-backed GX context at ``validate.gx_dir``, its Data Docs site at ``validate.docs``."""
    import great_expectations as gx

    root = workdir / cfg.gx_dir
    context = gx.get_context(mode="file", project_root_dir=str(root.parent))
    # GX keeps the site's folder relative to the context; params give it relative to the project.
    base = os.path.relpath(workdir / cfg.docs, root) + "/"
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": base},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    current = (context.variables.data_docs_sites or {}).get(SITE)
    if current != site:  # written only on change, so the committed config stays as it is
        if current is None:
            context.add_data_docs_site(SITE, site)
        else:
            context.update_data_docs_site(SITE, site)
    return context


def _saved_suite(context, table: str, expectations: list):
    """The suite ``table`` as saved in the context, rewritten only if ``expectations`` differ.

    Saving gives every expectation a new random id, and the suites are in git: an unchanged
    params.yaml must leave them byte-identical.
    """
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

    def settings(items) -> list[dict]:
        return [{k: v for k, v in e.configuration.to_json_dict().items() if k != "id"} for e in items]

    try:
        saved = context.suites.get(table)
    except DataContextError:  # not saved yet
        saved = None
    if saved is not None and settings(saved.expectations) == settings(expectations):
        return saved
    return context.suites.add_or_update(gx.ExpectationSuite(name=table, expectations=expectations))


def _datasource(context):
    """The pandas datasource of the three tables, created once (it lives in the context's config)."""
    try:
        return context.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        return context.data_sources.add_pandas(DATASOURCE)


def _batch_definition(datasource, table: str):
    try:
        asset = datasource.get_asset(table)
    except LookupError:
        asset = datasource.add_dataframe_asset(table)
    try:
        return asset.get_batch_definition("all")
    except KeyError:
        return asset.add_batch_definition_whole_dataframe("all")


def _result(table: str, item) -> CheckResult:
    """A CheckResult from one GX ExpectationValidationResult."""
    config = item.expectation_config
    details = item.result or {}
    key = KEYS[table]
    if "unexpected_index_list" in details:
        offending = [str(row[key]) for row in details["unexpected_index_list"]]
    elif "partial_missing_list" in details:  # a set expectation: what is missing
        offending = [f"missing: {value}" for value in details["partial_missing_list"]]
    elif not item.success:  # a table-level expectation: what was seen
        offending = [f"observed: {details.get('observed_value')}"]
    else:
        offending = []
    if item.exception_info and item.exception_info.get("raised_exception"):
        offending.append(f"error: {item.exception_info.get('exception_message')}")
    severity = getattr(config.severity, "value", str(config.severity)).lower()
    return CheckResult(config.meta["check"], table, config.description, severity, bool(item.success), offending)
