"""What the Reports page offers: a study's report (`report.write_report`: HTML, CSV or
Parquet), or chosen runs (any measurement, and results saved outside a study) as CSV or
Parquet rows with the same columns as a study's export (every store column, the payload as
JSON text and flattened)."""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .. import report

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FORMATS = report.FORMATS
"""Export formats: html, csv, parquet."""
RUN_FORMATS = ("csv", "parquet")
"""Formats of a runs export (the HTML report is drawn per study)."""


def study_options(store) -> list[dict[str, str]]:
    """One option per stored study with results (newest first)."""
    return [{"label": f"{s['name']} ({s['n_results']} results)", "value": s["name"]}
            for s in store.studies() if s["n_results"]]


def studies_table(store) -> list[dict[str, Any]]:
    """One display row per stored study (newest first): name, question, stages, results
    and when it was saved."""
    rows = []
    for s in store.studies():
        try:
            head = tomllib.loads(s["definition"]).get("study") or {}
        except tomllib.TOMLDecodeError:  # the store checks definitions parse; be safe anyway
            head = {}
        rows.append({"study": s["name"], "question": str(head.get("question") or ""),
                     "does": ", ".join(head.get("do") or ["predict"]),
                     "results": s["n_results"], "saved (UTC)": s["created_at"][:19].replace("T", " ")})
    return rows


def run_options(store) -> list[dict[str, Any]]:
    """One option per exportable run: every measurement, and every result saved outside a
    study (newest first)."""
    out = []
    for r in store.results(with_payload=False):
        if r["kind"] == "measurement" or r["study"] is None:
            where = f" [{r['study']}]" if r["study"] else ""
            out.append({"label": f"{r['kind']} {r['id']}: {r['model']} {r['plan']} "
                                 f"x{r['n_chips']} {r['cluster']} ({r['status']}){where}",
                        "value": r["id"]})
    return out


def runs_frame(store, ids: list[int]) -> pd.DataFrame:
    """The chosen results (oldest first) as `report.study_frame` lays a study out: every store
    column, `payload` as JSON text, `study_point.*` and `payload.*` flattened. ValueError for
    no ids or an id the store does not have."""
    if not ids:
        raise ValueError("runs: choose at least one run")
    wanted = {int(i) for i in ids}
    df = store.to_dataframe()
    df = df[df["id"].isin(wanted)].sort_values("id", kind="stable").reset_index(drop=True)
    missing = sorted(wanted - set(int(i) for i in df["id"]))
    if missing:
        raise ValueError(f"runs: no result with id {missing[0]} in the store")
    flat = []
    for text in df["payload"]:
        payload, row = json.loads(text), {}
        if "study_point" in payload:
            report._flatten(payload["study_point"], "study_point", row)
        for key, value in payload.items():
            if key != "study_point":
                report._flatten(value, f"payload.{key}", row)
        flat.append(row)
    return pd.concat([df, pd.DataFrame(flat, index=df.index)], axis=1)


def _safe(name: str) -> str:
    """A file-name-safe version of a study name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "report"


def export(store, study: str | None, run_ids: list[int] | None, fmt: str) -> tuple[str, bytes]:
    """(file name, bytes) of the export: study `study`'s report, or the chosen runs' rows.

    Exactly one of a study and runs must be chosen; runs export as CSV or Parquet only.
    ValueError (naming the field and the rule) otherwise, or when the study has no results.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} must be one of {', '.join(FORMATS)}")
    if bool(study) == bool(run_ids):
        raise ValueError("choose a study or runs (one of the two, not both)")
    with tempfile.TemporaryDirectory(prefix="workbench-report-") as tmp:
        if study:
            name = f"{_safe(study)}.{fmt}"
            path = report.write_report(store, study, fmt, Path(tmp) / name)
            return name, path.read_bytes()
        if fmt not in RUN_FORMATS:
            raise ValueError(f"format: runs export as {' or '.join(RUN_FORMATS)}; the HTML "
                             "report is drawn per study")
        frame = runs_frame(store, list(run_ids))
        ids = sorted(int(i) for i in frame["id"])
        name = ("runs-" + "-".join(str(i) for i in ids[:5])
                + ("-and-more" if len(ids) > 5 else "") + f".{fmt}")
        path = Path(tmp) / name
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            report._parquet_ready(frame).to_parquet(path, index=False, engine="pyarrow")
        return name, path.read_bytes()


def describe(name: str, data: bytes) -> str:
    """The line shown after a download: file name and size."""
    return f"Downloaded {name} ({len(data):,} bytes)."
