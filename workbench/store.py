"""SQLite results store: predictions, simulations, measurements, their time series, studies.

One file (default `$WORKBENCH_STORE`, else `~/.local/share/workbench/store.db`) that the cost
model, the simulator, the runner (every rank) and study workers write, and the app and reports
read. WAL journal, foreign keys on, a busy timeout so that several processes can write at once;
every write is one `BEGIN IMMEDIATE` transaction, so a crash never leaves half a result.

Schema (version 1 in `PRAGMA user_version`; `PRAGMA application_id` = `APPLICATION_ID`)::

  studies  name TEXT PK; definition TEXT (TOML, checked to parse); created_at TEXT (UTC ISO)
  results  id INTEGER PK AUTOINCREMENT (a deleted id is never reused)
           kind TEXT          prediction | simulation | measurement
           created_at TEXT    UTC ISO 8601 with microseconds; newest first = (created_at, id)
           model TEXT, family TEXT (optional), plan TEXT (`Plan.compact()`, normalised),
           cluster TEXT, n_chips INTEGER (>= 1), device TEXT (optional: "cpu",
           "NVIDIA H100 80GB HBM3"), status TEXT (ok | failed | partial; failed needs error),
           error TEXT (optional)
           step_time_s, mfu, hfu, tokens_per_s, samples_per_s, memory_peak_bytes REAL
                              the payload's keys of those names (NULL when absent or None)
           payload TEXT       full JSON (`Estimate.to_json()`, `SimResult.to_json()`, a
                              measurement's dict); NaN and infinity are refused
           prediction_id, simulation_id INTEGER
                              FK results(id) ON DELETE SET NULL: the prediction (of a
                              simulation or measurement) or simulation (of a measurement) of
                              the same model and plan
           study TEXT, point TEXT
                              FK studies(name) (saved first) and the study point's key;
                              (study, point, kind) is unique
  samples  id INTEGER PK; result_id INTEGER FK results(id) ON DELETE CASCADE;
           t_s REAL (seconds since the run started, >= 0); step INTEGER (>= 0 or NULL);
           metric TEXT ("power_w", "sm_clock_mhz", "step_time_s", ...); value REAL (finite)

Step times are samples with metric `step_time_s`. Migrations live in `MIGRATIONS` (entry i
upgrades version i to i + 1, each in one transaction); opening an older store upgrades it,
opening a newer one raises `StoreVersionError`.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .plan import Plan
from .store_values import (_now, _text, _real, _count, _choice, _payload_json, _plan_text, _sample_rows)

KINDS = ("prediction", "simulation", "measurement")
"""What a result is: predicted by the cost model, simulated, or measured on real chips."""
STATUSES = ("ok", "failed", "partial")
"""How a result ended."""
METRICS = ("step_time_s", "mfu", "hfu", "tokens_per_s", "samples_per_s", "memory_peak_bytes")
"""Payload keys copied into columns of `results` (all >= 0; step_time_s > 0)."""
COLUMNS = ("id", "kind", "created_at", "model", "family", "plan", "cluster", "n_chips",
           "device", "status", "error", *METRICS, "prediction_id", "simulation_id", "study",
           "point")
"""The columns of `results` other than the payload, in table order."""
APPLICATION_ID = int.from_bytes(b"WkBn", "big")
"""`PRAGMA application_id` of a workbench store (tells it from other SQLite files)."""
BUSY_TIMEOUT_S = 30.0
"""Default seconds a writer waits for another process's write lock before giving up."""

_V1 = (
    """CREATE TABLE studies (
        name TEXT PRIMARY KEY CHECK (length(name) > 0),
        definition TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    """CREATE TABLE results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('prediction', 'simulation', 'measurement')),
        created_at TEXT NOT NULL,
        model TEXT NOT NULL CHECK (length(model) > 0), family TEXT,
        plan TEXT NOT NULL CHECK (length(plan) > 0),
        cluster TEXT NOT NULL CHECK (length(cluster) > 0),
        n_chips INTEGER NOT NULL CHECK (n_chips >= 1), device TEXT,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'partial')), error TEXT,
        step_time_s REAL CHECK (step_time_s > 0), mfu REAL CHECK (mfu >= 0),
        hfu REAL CHECK (hfu >= 0), tokens_per_s REAL CHECK (tokens_per_s >= 0),
        samples_per_s REAL CHECK (samples_per_s >= 0),
        memory_peak_bytes REAL CHECK (memory_peak_bytes >= 0),
        payload TEXT NOT NULL,
        prediction_id INTEGER REFERENCES results(id) ON DELETE SET NULL,
        simulation_id INTEGER REFERENCES results(id) ON DELETE SET NULL,
        study TEXT REFERENCES studies(name), point TEXT,
        CHECK (point IS NULL OR study IS NOT NULL))""",
    "CREATE INDEX results_kind ON results(kind, created_at)",
    "CREATE INDEX results_model_plan ON results(model, plan)",
    "CREATE INDEX results_prediction ON results(prediction_id)",
    "CREATE INDEX results_simulation ON results(simulation_id)",
    "CREATE UNIQUE INDEX results_point ON results(study, point, kind) WHERE point IS NOT NULL",
    """CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
        t_s REAL NOT NULL CHECK (t_s >= 0),
        step INTEGER CHECK (step IS NULL OR step >= 0),
        metric TEXT NOT NULL CHECK (length(metric) > 0),
        value REAL NOT NULL CHECK (typeof(value) = 'real'))""",
    "CREATE INDEX samples_result ON samples(result_id, metric, t_s)",
    f"PRAGMA application_id = {APPLICATION_ID}",
)

Migration = Sequence[str] | Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = [_V1]
"""Entry i takes a store from version i to i + 1: SQL statements, or a function of the
connection. Each runs inside one transaction with `user_version` bumped in it (so `PRAGMA
foreign_keys` cannot be toggled there, and a function must not call `executescript`, which
commits). Append only; never edit a released entry."""


class StoreVersionError(RuntimeError):
    """The store was written by a newer workbench whose schema this code does not know."""


def default_path() -> Path:
    """`$WORKBENCH_STORE` when set, else `~/.local/share/workbench/store.db`."""
    env = os.environ.get("WORKBENCH_STORE")
    return Path(env).expanduser() if env else Path.home() / ".local/share/workbench/store.db"


class Store:
    """A workbench results store in one SQLite file (see the module docstring for the schema).

    `path` is the database file. Safe to share between threads of one process (calls are
    serialised) and to open from several processes at once. Use as a context manager, or call
    `close()`.
    """

    def __init__(self, path: str | Path | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S):
        """Open (creating parent folders and the file) and upgrade the store at `path`."""
        self.path = Path(path).expanduser() if path is not None else default_path()
        _real("busy_timeout_s", busy_timeout_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            try:
                self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                self._conn.execute("PRAGMA foreign_keys = ON")
                self._enable_wal(busy_timeout_s)
                self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL: atomic, fast commits
            except sqlite3.DatabaseError as err:
                if isinstance(err, sqlite3.OperationalError):  # locked past the timeout
                    raise
                raise ValueError(f"store: {self.path} is not a usable SQLite database "
                                 f"({err})") from None
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -------------------------------------------------------------------------
    def __enter__(self) -> Store:
        """The store itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the store."""
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent); the store is unusable afterwards."""
        with self._lock:
            self._conn.close()

    def _enable_wal(self, timeout_s: float) -> None:
        """Switch the file to WAL, retrying while another process holds it (switching
        needs the file to itself and does not wait on the busy timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise ValueError(f"store: {self.path} cannot use a WAL journal (got {mode})")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now (waits busy_timeout)
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        """All rows of one query."""
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    @property
    def schema_version(self) -> int:
        """The schema version of the file (`PRAGMA user_version`)."""
        return self._read("PRAGMA user_version")[0][0]

    def _migrate(self) -> None:
        """Apply the migrations the file lacks, one transaction each; refuse newer stores."""
        known = len(MIGRATIONS)
        app_id = self._read("PRAGMA application_id")[0][0]
        tables = self._read("SELECT count(*) FROM sqlite_master")[0][0]
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise ValueError(f"store: {self.path} is a SQLite database but not a workbench "
                             f"store (application_id {app_id}, {tables} schema objects)")
        version = self.schema_version
        if version > known:
            raise StoreVersionError(
                f"store: {self.path} has schema version {version}, but this workbench knows "
                f"versions up to {known}; upgrade workbench to read it")
        for target in range(version + 1, known + 1):
            with self._write() as conn:
                if conn.execute("PRAGMA user_version").fetchone()[0] >= target:
                    continue  # another process upgraded it while we waited for the lock
                step = MIGRATIONS[target - 1]
                if callable(step):
                    step(conn)
                else:
                    for statement in step:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")

    # -- results --------------------------------------------------------------------------
    def save(self, kind: str, *, model: str, plan: str | Plan, cluster: str, n_chips: int,
             payload: dict, family: str | None = None, device: str | None = None,
             status: str = "ok", error: str | None = None, prediction_id: int | None = None,
             simulation_id: int | None = None, study: str | None = None,
             point: str | None = None,
             samples: Iterable[tuple[float, int | None, str, float]] = ()) -> int:
        """Store one result and its time series in one transaction; return its id.

        `payload` is the full JSON dict (`Estimate.to_json()`, ...); its keys in `METRICS`
        become columns. `samples` are (t_s, step or None, metric, value) and may be a
        generator: a bad sample or an exception from it rolls back the whole result. Links
        (`prediction_id`, `simulation_id`) must name a stored result of that kind with the
        same model and plan; `point` needs `study`, which must be saved (`save_study`).
        Bad input raises ValueError naming the field; nothing is stored then.
        """
        row = _validated(kind, model, plan, cluster, n_chips, payload, family, device, status,
                         error, prediction_id, simulation_id, study, point)
        with self._write() as conn:
            return _insert(conn, row, samples)

    def save_point(self, study: str, point: str, results: Sequence[dict]) -> dict[str, int]:
        """Store every result of one study point in ONE transaction; return {kind: id}.

        Each entry holds `save()`'s keyword arguments with `kind` (at most one per kind).
        A simulation is linked to the point's prediction, a measurement to both. Either all
        of the point is stored or none of it: an interrupted study never keeps half a point.
        """
        kinds = [r.get("kind") for r in results]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"store: save_point takes one result per kind, got {kinds}")
        order = sorted(results, key=lambda r: KINDS.index(_choice("kind", r.get("kind"), KINDS)))
        ids: dict[str, int] = {}
        with self._write() as conn:
            for r in order:
                args = {k: v for k, v in r.items() if k != "samples"}
                if r["kind"] != "prediction":
                    args.setdefault("prediction_id", ids.get("prediction"))
                if r["kind"] == "measurement":
                    args.setdefault("simulation_id", ids.get("simulation"))
                row = _validated(study=study, point=point, **args)
                ids[r["kind"]] = _insert(conn, row, r.get("samples", ()))
        return ids

    def get(self, result_id: int) -> dict[str, Any]:
        """One result: its columns (`COLUMNS`) and `payload` parsed; KeyError if none."""
        rows = self._read(f"SELECT {', '.join(COLUMNS)}, payload FROM results WHERE id = ?",
                          (_count("result_id", result_id, 1),))
        if not rows:
            raise KeyError(f"store: no result with id {result_id}")
        return {**dict(rows[0]), "payload": json.loads(rows[0]["payload"])}

    def _where(self, kind: str | None, model: str | None, study: str | None,
               status: str | None) -> tuple[str, list]:
        """WHERE clause and arguments for the result filters (None = any)."""
        checks = {"kind": kind if kind is None else _choice("kind", kind, KINDS),
                  "model": _text("model", model, optional=True),
                  "study": _text("study", study, optional=True),
                  "status": status if status is None else _choice("status", status, STATUSES)}
        used = {k: v for k, v in checks.items() if v is not None}
        sql = " AND ".join(f"{k} = ?" for k in used)
        return (f"WHERE {sql}" if sql else ""), list(used.values())

    def results(self, kind: str | None = None, model: str | None = None,
                study: str | None = None, status: str | None = None, limit: int | None = None,
                with_payload: bool = True) -> list[dict[str, Any]]:
        """Results matching every filter given, newest first, at most `limit` of them.

        Each is a dict of `COLUMNS` plus the parsed `payload` (left out when `with_payload`
        is False, which is faster over many large payloads).
        """
        where, args = self._where(kind, model, study, status)
        if limit is not None:
            args.append(_count("limit", limit, 1))
        columns = ", ".join((*COLUMNS, "payload") if with_payload else COLUMNS)
        rows = self._read(f"SELECT {columns} FROM results {where} ORDER BY created_at DESC, "
                          "id DESC" + (" LIMIT ?" if limit is not None else ""), args)
        return [{**dict(r), "payload": json.loads(r["payload"])} if with_payload else dict(r)
                for r in rows]

    def samples(self, result_id: int, metric: str | None = None) -> list[dict[str, Any]]:
        """The time series of a result (one metric, or all), in time order, as dicts of
        `t_s`, `step`, `metric`, `value`; KeyError if the result does not exist."""
        if not self._read("SELECT 1 FROM results WHERE id = ?",
                          (_count("result_id", result_id, 1),)):
            raise KeyError(f"store: no result with id {result_id}")
        metric = _text("metric", metric, optional=True)
        rows = self._read("SELECT t_s, step, metric, value FROM samples WHERE result_id = ?"
                          + (" AND metric = ?" if metric else "") + " ORDER BY t_s, id",
                          (result_id, metric) if metric else (result_id,))
        return [dict(r) for r in rows]

    def has_point(self, study: str, point: str, kind: str | None = None) -> bool:
        """Whether `point` of `study` has a stored result (of `kind`, or any), failed or not:
        a resumed study skips it (delete the result to run it again)."""
        args = [_text("study", study), _text("point", point)]
        if kind is not None:
            args.append(_choice("kind", kind, KINDS))
        return bool(self._read("SELECT 1 FROM results WHERE study = ? AND point = ?"
                               + (" AND kind = ?" if kind else "") + " LIMIT 1", args))

    def study_points(self, study: str) -> dict[str, set[str]]:
        """The stored points of `study`: point key -> the kinds stored for it."""
        out: dict[str, set[str]] = {}
        for r in self._read("SELECT point, kind FROM results WHERE study = ? AND point IS NOT "
                            "NULL", (_text("study", study),)):
            out.setdefault(r["point"], set()).add(r["kind"])
        return out

    def delete(self, result_id: int) -> None:
        """Delete a result and its samples; links to it become NULL. KeyError if none."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM results WHERE id = ?",
                               (_count("result_id", result_id, 1),))
            if cur.rowcount == 0:
                raise KeyError(f"store: no result with id {result_id}")

    # -- studies --------------------------------------------------------------------------
    def save_study(self, name: str, definition: str) -> None:
        """Record a study's TOML definition. Saving the same text again is a no-op (resume);
        a different definition under a stored name raises ValueError."""
        name = _text("name", name)
        _text("definition", definition)
        try:
            tomllib.loads(definition)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"store: definition of study {name!r} is not TOML ({err})") from None
        with self._write() as conn:
            row = conn.execute("SELECT definition FROM studies WHERE name = ?",
                               (name,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO studies (name, definition, created_at) "
                             "VALUES (?, ?, ?)", (name, definition, _now()))
            elif row["definition"] != definition:
                raise ValueError(f"store: study {name!r} is already saved with another "
                                 f"definition; a resumed study keeps its definition")

    _STUDY_SQL = ("SELECT s.name, s.definition, s.created_at, count(r.id) AS n_results "
                  "FROM studies s LEFT JOIN results r ON r.study = s.name ")

    def study(self, name: str) -> dict[str, Any]:
        """A study: `name`, `definition` (TOML text), `created_at`, `n_results`; KeyError if
        none."""
        rows = self._read(self._STUDY_SQL + "WHERE s.name = ? GROUP BY s.name",
                          (_text("name", name),))
        if not rows:
            raise KeyError(f"store: no study named {name!r}")
        return dict(rows[0])

    def studies(self) -> list[dict[str, Any]]:
        """Every study (as `study()` gives it), newest first."""
        rows = self._read(self._STUDY_SQL + "GROUP BY s.name "
                          "ORDER BY s.created_at DESC, s.rowid DESC")
        return [dict(r) for r in rows]

    # -- reports --------------------------------------------------------------------------
    def to_dataframe(self, kind: str | None = None, study: str | None = None):
        """A pandas DataFrame of results (newest first): `COLUMNS` with `created_at` as UTC
        datetimes, link ids as nullable integers, and `payload` as JSON text."""
        import pandas as pd

        where, args = self._where(kind, None, study, None)
        rows = self._read(f"SELECT {', '.join(COLUMNS)}, payload FROM results {where} "
                          "ORDER BY created_at DESC, id DESC", args)
        df = pd.DataFrame([tuple(r) for r in rows], columns=[*COLUMNS, "payload"])
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True, format="ISO8601")
        for name in ("id", "n_chips", "prediction_id", "simulation_id"):
            df[name] = df[name].astype("Int64")
        for name in METRICS:
            df[name] = df[name].astype("float64")
        return df


def _validated(kind, model, plan, cluster, n_chips, payload, family=None, device=None,
               status="ok", error=None, prediction_id=None, simulation_id=None, study=None,
               point=None) -> dict[str, Any]:
    """`Store.save`'s arguments checked and normalised (ValueError naming the field)."""
    kind = _choice("kind", kind, KINDS)
    status = _choice("status", status, STATUSES)
    model = _text("model", model)
    # a study point whose search found no plan that fits is stored failed with plan "search"
    plan_text = "search" if status == "failed" and plan == "search" else _plan_text(plan)
    cluster = _text("cluster", cluster)
    n_chips = _count("n_chips", n_chips, 1)
    family = _text("family", family, optional=True)
    device = _text("device", device, optional=True)
    if status == "failed" and error is None:
        raise ValueError("store: error is required when status is 'failed'")
    error = _text("error", error, optional=True)
    study = _text("study", study, optional=True)
    point = _text("point", point, optional=True)
    if point is not None and study is None:
        raise ValueError("store: point needs study (a point belongs to a study)")
    text = _payload_json(payload)
    metrics = [None if payload.get(m) is None else
               _real(f"payload[{m!r}]", payload[m], strict=m == "step_time_s")
               for m in METRICS]
    links = {"prediction_id": (prediction_id, ("simulation", "measurement")),
             "simulation_id": (simulation_id, ("measurement",))}
    for field, (link, kinds) in links.items():
        if link is not None and kind not in kinds:
            raise ValueError(f"store: {field} links only {' and '.join(kinds)} results, "
                             f"not a {kind}")
    return dict(kind=kind, model=model, plan_text=plan_text, cluster=cluster, n_chips=n_chips,
                family=family, device=device, status=status, error=error, study=study,
                point=point, text=text, metrics=metrics, links=links,
                prediction_id=prediction_id, simulation_id=simulation_id)


def _insert(conn: sqlite3.Connection, v: dict[str, Any], samples: Iterable) -> int:
    """Insert one validated result (and its samples) inside the caller's transaction."""
    kind, model, plan_text, study, point = (v["kind"], v["model"], v["plan_text"], v["study"],
                                            v["point"])
    for field, (link, _) in v["links"].items():
        if link is None:
            continue
        row = conn.execute("SELECT kind, model, plan FROM results WHERE id = ?",
                           (_count(field, link, 1),)).fetchone()
        want = field.removesuffix("_id")
        if row is None or row["kind"] != want:
            raise ValueError(f"store: {field} {link} is not a stored {want}")
        if (row["model"], row["plan"]) != (model, plan_text):
            raise ValueError(f"store: {field} {link} is {row['model']} {row['plan']}, "
                             f"not the same model and plan as {model} {plan_text}")
    if study is not None and conn.execute("SELECT 1 FROM studies WHERE name = ?",
                                          (study,)).fetchone() is None:
        raise ValueError(f"store: study {study!r} is not saved; call save_study first")
    if point is not None and conn.execute(
            "SELECT 1 FROM results WHERE study = ? AND point = ? AND kind = ?",
            (study, point, kind)).fetchone():
        raise ValueError(f"store: point {point!r} of study {study!r} already has a "
                         f"{kind}; delete it to redo the point")
    cur = conn.execute(
        f"INSERT INTO results ({', '.join(COLUMNS[1:])}, payload) "
        f"VALUES ({', '.join('?' * len(COLUMNS))})",
        (kind, _now(), model, v["family"], plan_text, v["cluster"], v["n_chips"], v["device"],
         v["status"], v["error"], *v["metrics"], v["prediction_id"], v["simulation_id"], study,
         point, v["text"]))
    result_id = cur.lastrowid
    conn.executemany("INSERT INTO samples (result_id, t_s, step, metric, value) "
                     "VALUES (?, ?, ?, ?, ?)", _sample_rows(result_id, samples))
    return result_id
