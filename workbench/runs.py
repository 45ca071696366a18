"""The results store: an embedded SQLite database of every parity and benchmark run.

    from workbench import runs
    store = runs.RunStore()                     # $WORKBENCH_DB, else the user data dir
    run_id = store.save("parity", meta, rows)   # one transaction: the whole run or nothing
    store.list(kind="parity")                   # DataFrame, one row per run, newest first
    run = store.load(run_id[:6])                # Run(run_id, kind, meta, rows: DataFrame); unique prefixes work
    store.compare_bench(new_id, baseline_id)    # ratios per (backend, dtype, ...) and a `regression` flag
    store.export_runs("mac.jsonl.gz")           # a verified, versioned file of runs for another machine ...
    other.import_runs("mac.jsonl.gz")           # ... merged there: no duplicates, provenance kept

Layout (schema version 1, kept in ``PRAGMA user_version``):

* ``runs``: one row per run. The meta keys the store understands are columns (model, source, source_hash,
  backends, device, dtypes, git_commit, passed, created_at) or JSON columns (versions, params, machine);
  every other meta key goes to the JSON column ``extra``. ``columns`` is the JSON list of row columns in order.
* ``run_rows``: one row per metric row, ``(run_id, idx, data)``, ``data`` being a JSON object. Non-finite
  floats, which JSON cannot hold, are written as ``{"$float": "nan" | "inf" | "-inf"}``.

* ``run_imports``: provenance of runs merged in from another store's export (origin host and store, the
  file and its SHA-256, when and where imported); runs made in this store have no row there.

Safety: an existing file is checked on a read-only connection; one that is not a SQLite database, is corrupt
(``PRAGMA quick_check``), belongs to another application, or was written by a newer schema is refused with
:class:`RunStoreError` and left byte for byte as it was. A store this process can't write opens read-only (a
write raises RunStoreError saying why). Writers use WAL, a 30 s busy timeout and retries, so several
processes can save while others read; a writer killed at any point leaves its run whole or absent.
A damaged record is skipped by :meth:`RunStore.list` (reported in ``store.problems``) and refused by
:meth:`RunStore.load`. Only the standard library is imported here; pandas is imported when a frame is built.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "SCHEMA_VERSION", "KINDS", "RunStoreError", "RunStoreWarning", "Run", "RunStore",
    "default_path", "collect_versions", "git_commit", "machine_info", "list", "load", "compare_bench",
    "export_runs", "import_runs", "EXPORT_FORMAT", "EXPORT_VERSION",
]

_list = builtins.list  # this module defines list() below

SCHEMA_VERSION = 1
APPLICATION_ID = 0x47574231  # "GWB1": marks the file as a gemma-workbench results store
KINDS = ("parity", "bench", "diverge")
BUSY_TIMEOUT_S = 30.0
WRITE_ATTEMPTS = 8
_SQLITE_MAGIC = b"SQLite format 3\x00"
_APP_DIR = "gemma-workbench"
_DB_NAME = "runs.sqlite"

# meta keys stored in their own columns; everything else goes to `extra`
_SCALAR_KEYS = ("model", "source", "source_hash", "device", "git_commit")
_JSON_KEYS = ("versions", "params", "machine")
_KNOWN_KEYS = _SCALAR_KEYS + _JSON_KEYS + ("backends", "dtypes", "passed", "created_at")
# columns of the runs table that hold JSON
_JSON_COLUMNS = ("backends", "dtypes", "columns", "versions", "params", "machine", "extra")

# provenance of imported runs (runs made in this store have none); created by the first import in stores
# made before it existed
_IMPORTS_TABLE = """
CREATE TABLE IF NOT EXISTS run_imports (
    run_id        TEXT PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    origin_host   TEXT,
    origin_store  TEXT,
    exported_at   TEXT,
    exported_by   TEXT,
    source_file   TEXT,
    source_sha256 TEXT,
    imported_at   TEXT NOT NULL,
    imported_on   TEXT,
    via           TEXT
)"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT    NOT NULL UNIQUE,
    kind        TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    model       TEXT,
    source      TEXT,
    source_hash TEXT,
    backends    TEXT,
    device      TEXT,
    dtypes      TEXT,
    git_commit  TEXT,
    passed      INTEGER,
    n_rows      INTEGER NOT NULL,
    columns     TEXT    NOT NULL,
    versions    TEXT,
    params      TEXT,
    machine     TEXT,
    extra       TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_by_kind ON runs (kind, created_at);
CREATE INDEX IF NOT EXISTS runs_by_model ON runs (model, created_at);
CREATE TABLE IF NOT EXISTS run_rows (
    run_id TEXT    NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    data   TEXT    NOT NULL,
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
""" + _IMPORTS_TABLE + ";\n"
_OUR_TABLES = {"runs", "run_rows"}


class RunStoreError(RuntimeError):
    """The results database can't be used (not SQLite, corrupt, newer schema, damaged record ...)."""


class RunStoreWarning(UserWarning):
    """A damaged record was skipped."""


class UnknownRunError(KeyError):
    """No run (or no unique run) matches the id or prefix given."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass
class Run:
    run_id: str
    kind: str
    meta: dict
    rows: Any  # pandas.DataFrame, columns in the order they were saved
    # for a run merged in by RunStore.import_runs: origin_host, origin_store, exported_at, exported_by,
    # source_file, source_sha256, imported_at, imported_on, via (the stores it passed through); else None
    provenance: dict | None = None
    # the rows exactly as saved (one dict each, only the keys that row had; types kept), beside the DataFrame
    records: list | None = field(default=None, repr=False, compare=False)

    @property
    def created_at(self) -> str | None:
        return self.meta.get("created_at")

    def __repr__(self) -> str:
        return (f"Run({self.run_id!r}, kind={self.kind!r}, model={self.meta.get('model')!r}, "
                f"created_at={self.created_at!r}, rows={len(self.rows)})")


# --------------------------------------------------------------------------------------------------------------
# paths and provenance


def default_path() -> Path:
    """``$WORKBENCH_DB`` if set, else ``<user data dir>/gemma-workbench/runs.sqlite``: ``$XDG_DATA_HOME`` (default
    ``~/.local/share``) on Linux, ``~/Library/Application Support`` on macOS, ``%LOCALAPPDATA%`` on Windows."""
    env = os.environ.get("WORKBENCH_DB")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    elif sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / _APP_DIR / _DB_NAME


_VERSION_PACKAGES = {  # key -> distribution names to try
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "torch": ("torch",),
    "mlx": ("mlx",),
    "transformers": ("transformers",),
    "tokenizers": ("tokenizers",),
    "gguf": ("gguf",),
    "llama_cpp": ("llama_cpp_python", "llama-cpp-python"),
}


def collect_versions() -> dict:
    """Versions of python and the libraries that matter, from package metadata (nothing heavy is imported).
    Packages that are not installed are left out. Never raises."""
    from importlib import metadata
    out: dict[str, str] = {"python": platform.python_version()}
    for key, dists in _VERSION_PACKAGES.items():
        for dist in dists:
            try:
                out[key] = metadata.version(dist)
                break
            except Exception:
                continue
    try:
        out["workbench"] = metadata.version("gemma-workbench")
    except Exception:
        wb = sys.modules.get("workbench")
        if getattr(wb, "__version__", None):
            out["workbench"] = str(wb.__version__)
    # details only where the module is already imported (importing torch here would cost seconds)
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if getattr(torch, "__version__", None):
                out["torch"] = str(torch.__version__)
            cuda = getattr(getattr(torch, "version", None), "cuda", None)
            if cuda:
                out["cuda"] = str(cuda)
        except Exception:
            pass
    out["sqlite"] = sqlite3.sqlite_version
    return out


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit checked out at ``path`` (default: the gemma-workbench checkout this module lives in), with
    ``-dirty`` appended if tracked files are modified; None when it isn't a git checkout or git is missing.
    Read-only (``--no-optional-locks``: doesn't even refresh the index); never raises."""
    try:
        pkg_root = Path(__file__).resolve().parent.parent
        where = Path(path).resolve() if path is not None else pkg_root
        if not where.is_dir():
            where = where.parent
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
        env.pop("GIT_DIR", None)
        env.pop("GIT_WORK_TREE", None)

        def git(*args: str) -> str | None:
            p = subprocess.run(["git", "--no-optional-locks", "-C", str(where), *args], capture_output=True,
                               text=True, timeout=10, env=env, stdin=subprocess.DEVNULL)
            return p.stdout.strip() if p.returncode == 0 else None

        top = git("rev-parse", "--show-toplevel")
        if not top:
            return None
        if path is None and Path(top).resolve() != pkg_root:
            return None  # installed inside some other repository: its commit isn't ours
        sha = git("rev-parse", "HEAD")
        if not sha:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if status else "")
    except Exception:
        return None


def _cpu_name() -> str | None:
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, val = line.partition(":")
                    if key.strip() in ("model name", "Model", "Hardware", "cpu model") and val.strip():
                        return val.strip()
        elif sys.platform == "darwin":
            p = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=5, stdin=subprocess.DEVNULL)
            if p.returncode == 0 and p.stdout.strip():
                return p.stdout.strip()
    except Exception:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/meminfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        return int(line.split()[1]) * 1024
        elif sys.platform == "darwin":
            p = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5,
                               stdin=subprocess.DEVNULL)
            if p.returncode == 0:
                return int(p.stdout.strip())
    except Exception:
        pass
    return None


def machine_info() -> dict:
    """Hostname, OS, architecture, CPU model, core count and memory of this machine. Never raises."""
    info: dict[str, Any] = {}
    for key, fn in (("hostname", socket.gethostname), ("platform", platform.platform),
                    ("system", platform.system), ("release", platform.release), ("arch", platform.machine),
                    ("cpu", _cpu_name), ("cpu_count", os.cpu_count), ("memory_bytes", _memory_bytes),
                    ("python", platform.python_version)):
        try:
            info[key] = fn()
        except Exception:
            info[key] = None
    return info


def provenance() -> dict:
    """What a stored run records about where it ran: library versions, the git commit, the machine."""
    return dict(versions=collect_versions(), git_commit=git_commit(), machine=machine_info())


def save_run(kind: str, meta: dict, rows, db=None, devices: dict | None = None, **extra) -> str:
    """Store a run of ``wb.compare`` / ``wb.bench`` / ``wb.diverge`` with its provenance (``provenance()``: versions,
    git commit, machine); ``devices`` ({target: device}) become the run's ``device`` ("a, b"); ``extra`` (such as
    ``params``) is added to the meta. ``meta`` itself is not changed. Returns the run id."""
    meta_store = dict(meta, **provenance())
    if devices is not None:
        meta_store["device"] = ", ".join(sorted(set(devices.values()))) or None
    meta_store.update(extra)
    with RunStore(db) as st:
        return st.save(kind, meta_store, rows)


# --------------------------------------------------------------------------------------------------------------
# values <-> JSON, keeping types (NaN and inf included)

_MARKERS = ("$float", "$dict")


def _numpy_item(v):
    """numpy scalars/arrays -> Python, without importing numpy."""
    mod = type(v).__module__ or ""
    if mod.split(".")[0] != "numpy":
        return _NOT
    if hasattr(v, "ndim") and getattr(v, "ndim", 0) > 0 and hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return _NOT


_NOT = object()


def _encode(v, strict: bool, where: str = "value"):
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if math.isfinite(v):
            return float(v)
        return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                if strict:
                    raise TypeError(f"{where}: dict key {k!r} is not a string")
                k = str(k)
            out[k] = _encode(x, strict, f"{where}[{k!r}]")
        if len(out) == 1 and next(iter(out)) in _MARKERS:
            return {"$dict": [[k, x] for k, x in out.items()]}  # a user dict that looks like one of our markers
        return out
    if isinstance(v, (_list, tuple)):
        return [_encode(x, strict, f"{where}[{i}]") for i, x in enumerate(v)]
    item = _numpy_item(v)
    if item is not _NOT:
        return _encode(item, strict, where)
    if strict:
        raise TypeError(f"{where}: {type(v).__name__} {v!r:.80} can't be stored (use int, float, str, bool, None, "
                        "or lists/dicts of those)")
    if isinstance(v, (set, frozenset)):
        return [_encode(x, strict, where) for x in sorted(v, key=repr)]
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return repr(v)


def _decode_hook(d: dict):
    if len(d) == 1:
        if "$float" in d:
            return float(d["$float"])
        if "$dict" in d and isinstance(d["$dict"], _list):
            return {k: x for k, x in d["$dict"]}
    return d


def _dumps(v, strict: bool = False, where: str = "value") -> str:
    return json.dumps(_encode(v, strict, where), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _loads(s):
    if s is None:
        return None
    return json.loads(s, object_hook=_decode_hook)


def _utc_iso(value=None) -> str:
    if value is None:
        t = _dt.datetime.now(_dt.timezone.utc)
    elif isinstance(value, _dt.datetime):
        t = value
    elif isinstance(value, str):
        try:
            t = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"created_at {value!r} is not an ISO-8601 timestamp") from None
    else:
        raise ValueError(f"created_at must be an ISO-8601 string or datetime, not {type(value).__name__}")
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)  # naive: taken as UTC
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


# (st_dev, st_ino) -> (st_size, st_mtime_ns) of database files that passed PRAGMA quick_check in this process.
# The file of a WAL database changes only when a checkpoint writes to it, so the dashboard, which reopens the
# store on every rerun, checks a 10,000-run store once (~0.3 s) rather than every time; any change of size or
# modification time (a checkpoint, a damaged or replaced file) makes the next open check it again.
_VERIFIED: dict = {}


def _file_stamp(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)


def _hook(stage: str) -> None:
    """Called at the stages of a write ("begin", "run_row", "rows", "before_commit"); does nothing. Tests
    replace it (in a child process) to stop a writer there and kill it."""


def _is_locked(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


# --------------------------------------------------------------------------------------------------------------
# the store


class RunStore:
    """An embedded SQLite store of parity and benchmark runs. ``path`` None -> :func:`default_path`.

    Opening verifies the file on a **read-only** connection (SQLite format, ``PRAGMA quick_check``,
    application id, schema version, tables) before anything is written; a file that fails is refused and left
    as it was; a sound store of ours is then used through one read-write connection. A store on a file or
    directory this process can't write (or ``readonly=True``) stays on the read-only connection, and any write
    raises :class:`RunStoreError` saying so (``store.read_only`` holds the reason, None when writable).
    Parent directories are created for a new store. Usable as a context manager; safe to share between
    threads; reconnects after ``fork``.

    The raw bytes of the database file are never read with ``open()``: closing any descriptor of a file
    drops every POSIX lock this process holds on it (also those of other SQLite connections in this
    process), after which a writer elsewhere can checkpoint and delete the WAL under them; readers then see
    "database disk image is malformed" (issue 20).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = BUSY_TIMEOUT_S,
                 readonly: bool = False):
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.timeout = float(timeout)
        self.problems: list[str] = []
        self.read_only: str | None = "opened with readonly=True" if readonly else None
        self._want_readonly = bool(readonly)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None    # reads: the writer, or a read-only connection
        self._wconn: sqlite3.Connection | None = None   # writes: None while the store is read-only
        self._ino = None
        self._pid = None
        self._connect()

    # -- connection -------------------------------------------------------------------------------------------

    def _refuse(self, why: str) -> RunStoreError:
        return RunStoreError(f"{self.path}: {why}; the file was not modified")

    def _uri(self, **params) -> str:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return self.path.resolve().as_uri() + ("?" + q if q else "")  # as_uri escapes ? # % and spaces

    def _new_conn(self, **params) -> sqlite3.Connection:
        if params:
            conn = sqlite3.connect(self._uri(**params), uri=True, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
        else:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _not_writable_reason(self) -> str | None:
        if not os.access(self.path, os.W_OK):
            return "the file is not writable"
        if not os.access(self.path.parent, os.W_OK):
            return "its directory is not writable (SQLite needs to create -wal/-shm files there to write)"
        return None

    def _inspect(self, conn: sqlite3.Connection) -> tuple[str, int]:
        """('new' | 'ours', schema version) for a sound file; RunStoreError for a foreign/damaged/newer one.
        Reads only, in one read transaction: another process may be creating the schema right now, and
        reading application_id before its commit and user_version after it would look like a foreign file."""
        stamp = _file_stamp(self.path)
        conn.execute("BEGIN")
        try:
            if stamp is not None and _VERIFIED.get(stamp[0]) == stamp[1]:
                bad = ["ok"]  # this very file passed quick_check in this process and hasn't changed since
            else:
                bad = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            objects = {(r[0], r[1]) for r in conn.execute(
                "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
        finally:
            with contextlib.suppress(Exception):
                conn.execute("COMMIT")
        tables = {n for t, n in objects if t == "table"}
        if bad != ["ok"]:
            raise self._refuse("is corrupt (PRAGMA quick_check: " + "; ".join(map(str, bad)) +
                               "); pass another --db/WORKBENCH_DB, or move the file aside")
        if app_id not in (0, APPLICATION_ID):
            raise self._refuse(f"is an SQLite database of another application (application_id {app_id:#x}), "
                               "not a gemma-workbench results store; pass another --db/WORKBENCH_DB")
        if version > SCHEMA_VERSION and app_id == APPLICATION_ID:
            raise RunStoreError(f"{self.path} was written by a newer gemma-workbench (schema {version} > "
                                f"{SCHEMA_VERSION}); upgrade gemma-workbench, or pass another --db/WORKBENCH_DB; "
                                "the file was not modified")
        if app_id == 0 and version == 0 and not objects:
            return "new", 0  # an empty database: ours to initialise
        if app_id != APPLICATION_ID or version == 0:
            # a store we made has application_id and user_version set in the transaction creating its tables
            raise self._refuse("is an SQLite database of another application (tables: " +
                               (", ".join(sorted(tables)) or "none") + f", application_id {app_id:#x}, "
                               f"user_version {version}), not a gemma-workbench results store; "
                               "pass another --db/WORKBENCH_DB")
        if not _OUR_TABLES <= tables:
            raise self._refuse(f"is not a gemma-workbench results store (schema {version}, tables: " +
                               (", ".join(sorted(tables)) or "none") + "); pass another --db/WORKBENCH_DB")
        if stamp is not None and _file_stamp(self.path) == stamp:
            _VERIFIED[stamp[0]] = stamp[1]
        return "ours", version

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new (empty) database, unless another process just did."""
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("BEGIN IMMEDIATE")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            v = conn.execute("PRAGMA user_version").fetchone()[0]
            n = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            if v == 0 and app_id == 0 and n == 0:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        if not (v == 0 and app_id == 0 and n == 0):
            self._inspect(conn)  # someone else created it meanwhile: check what they made

    def _sidecars(self) -> dict:
        return {s: Path(str(self.path) + s).exists() for s in ("-wal", "-shm")}

    def _tidy_after_refusal(self, before: dict) -> None:
        """A read-only connection to a WAL-mode file creates -wal/-shm next to it and can't remove them. If we
        made them, let SQLite remove them the way it does when its last connection closes (a read-write
        connection that reads nothing: its WAL is empty, so the database file isn't written)."""
        if all(before.values()) or not any(self._sidecars().values()):
            return
        with contextlib.suppress(Exception):
            c = sqlite3.connect(str(self.path), timeout=1.0, isolation_level=None)
            with contextlib.suppress(Exception):
                c.execute("PRAGMA schema_version").fetchone()
            c.close()

    def _verify_existing(self) -> sqlite3.Connection:
        """A read-only connection to the existing, non-empty file, after checking it; else RunStoreError."""
        before = self._sidecars()
        conn = self._new_conn(mode="ro")
        try:
            try:
                state, _ = self._inspect(conn)
            except sqlite3.OperationalError as e:
                if "unable to open" not in str(e).lower() or os.access(self.path.parent, os.W_OK):
                    raise
                # a WAL-mode store in a read-only directory without -wal/-shm: nobody can have written to it
                # since its last writer closed it (which folds the WAL into the file), so read the file itself
                conn.close()
                wal = Path(str(self.path) + "-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise RunStoreError(f"{self.path}: its write-ahead log ({wal.name}) holds changes that can't be "
                                        "read without a -shm file, which can't be created in this read-only "
                                        "directory; open it once where the directory is writable") from e
                conn = self._new_conn(mode="ro", immutable=1)
                state, _ = self._inspect(conn)
                if self.read_only is None:
                    self.read_only = ("its directory is not writable; read as an immutable file (changes made "
                                      "meanwhile by others are not seen)")
        except BaseException as e:
            conn.close()
            if not _is_locked(e):
                self._tidy_after_refusal(before)
            raise
        if state == "new":
            conn.close()
            return None
        return conn

    def _connect(self) -> sqlite3.Connection:
        """The reading connection, opening (and checking) the file first if needed."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._conn = self._wconn = None  # after fork: never use the parent's connections
        p = self.path
        if p.exists() and not p.is_file():
            raise RunStoreError(f"{p} is not a file (a directory?); pass a file path as --db/WORKBENCH_DB")
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            try:
                conn = self._open_once()
            except BaseException as e:
                if _is_locked(e) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                if isinstance(e, RunStoreError) or not isinstance(e, sqlite3.DatabaseError):
                    raise
                if _is_locked(e):
                    raise RunStoreError(f"{p} stayed locked by another process for {self.timeout:.0f} s") from e
                if getattr(e, "sqlite_errorname", "") == "SQLITE_NOTADB" or "not a database" in str(e):
                    size = p.stat().st_size if p.exists() else 0
                    raise self._refuse("is not a gemma-workbench results database (not an SQLite file, "
                                       f"{size} bytes); pass another --db/WORKBENCH_DB") from e
                raise self._refuse(f"is not a usable SQLite database ({e}); pass another --db/WORKBENCH_DB, "
                                   "or move the file aside") from e
            self._conn, self._pid = conn, os.getpid()
            return conn

    def _open_once(self) -> sqlite3.Connection:
        p = self.path
        size = p.stat().st_size if p.exists() else None
        if size:  # an existing database: check it read-only
            conn = self._verify_existing()
            if conn is not None:
                if self.read_only is None:
                    self.read_only = self._not_writable_reason()
                self._ino = p.stat().st_ino
                if self.read_only:
                    return conn
                # ours and writable: one read-write connection for reads and writes (the last one to close
                # folds the WAL back into the file and removes -wal/-shm, as SQLite does)
                try:
                    w = self._open_writer()
                finally:
                    conn.close()
                self._wconn = w
                return w
        # a new store (no file, an empty file, or an empty database)
        if self._want_readonly:
            raise RunStoreError(f"{p}: there is no results store there yet (opened read-only: nothing created)")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunStoreError(f"{p}: can't create the results store's directory ({e}); pass a writable "
                                "--db/WORKBENCH_DB") from e
        if not p.exists() and not os.access(p.parent, os.W_OK):
            raise RunStoreError(f"{p}: there is no results store there, and none can be made (its directory is "
                                "not writable); pass a writable --db/WORKBENCH_DB")
        if p.exists() and (reason := self._not_writable_reason()):
            raise RunStoreError(f"{p} is an empty file that can't be made a results store: {reason}; pass a "
                                "writable --db/WORKBENCH_DB")
        conn = self._new_conn()
        try:
            self._initialise(conn)
            self._setup_writer(conn)
        except BaseException:
            conn.close()
            raise
        self._ino = p.stat().st_ino
        self._wconn = conn
        return conn

    def _setup_writer(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")

    def _writer(self) -> sqlite3.Connection:
        """The read-write connection; RunStoreError on a read-only store."""
        self._connect()
        if self.read_only:
            raise RunStoreError(f"{self.path} is read-only ({self.read_only}): runs can be listed and loaded, "
                                "but not saved, imported or deleted; pass a writable --db/WORKBENCH_DB")
        if self._wconn is not None:
            return self._wconn
        try:
            ino = self.path.stat().st_ino
        except OSError as e:
            raise RunStoreError(f"{self.path} vanished since it was opened ({e})") from e
        if ino != self._ino:
            raise RunStoreError(f"{self.path} was replaced by another file since it was opened; open it again")
        self._wconn = self._open_writer()
        return self._wconn

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._new_conn()
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
            self._setup_writer(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for c in {id(c): c for c in (self._conn, self._wconn) if c is not None}.values():
                    with contextlib.suppress(Exception):
                        c.close()
            self._conn = self._wconn = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:    # at interpreter shutdown module globals (contextlib, os) may already be gone
            self.close()
        except BaseException:
            pass

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r}" + (", read-only" if self.read_only else "") + ")"

    def _write(self, fn):
        """Run ``fn(conn)`` in one BEGIN IMMEDIATE transaction; roll back on any exception; retry if locked."""
        delay = 0.05
        for attempt in range(WRITE_ATTEMPTS):
            with self._lock:
                conn = self._writer()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as e:
                    if _is_locked(e) and attempt < WRITE_ATTEMPTS - 1:
                        pass  # sleep below, outside the lock
                    else:
                        raise self._write_error(e) from e
                else:
                    try:
                        _hook("begin")
                        out = fn(conn)
                        _hook("before_commit")
                        conn.execute("COMMIT")
                        return out
                    except BaseException as e:
                        with contextlib.suppress(Exception):
                            conn.execute("ROLLBACK")
                        if not (_is_locked(e) and attempt < WRITE_ATTEMPTS - 1):
                            if isinstance(e, sqlite3.OperationalError):
                                raise self._write_error(e) from e
                            raise
            time.sleep(delay * (1 + secrets.randbelow(100) / 100))
            delay = min(delay * 2, 2.0)
        raise RunStoreError(f"{self.path}: still locked after {WRITE_ATTEMPTS} attempts")  # pragma: no cover

    def _write_error(self, e: BaseException) -> RunStoreError:
        if "readonly" in str(e).lower() or "read-only" in str(e).lower():
            return RunStoreError(f"{self.path} is read-only ({e}): runs can be listed and loaded, but not saved, "
                                 "imported or deleted; pass a writable --db/WORKBENCH_DB")
        return RunStoreError(f"{self.path}: can't write ({e})")


    # -- writing ----------------------------------------------------------------------------------------------

    def save(self, kind: str, meta: dict | None, rows: Iterable[dict]) -> str:
        """Store one run: ``meta`` (dict) and ``rows`` (list of flat dicts). Returns the new run id.

        The run row and all its metric rows are written in one transaction: if anything fails (a value that
        can't be stored raises TypeError) nothing is left behind. Missing ``created_at`` is set to now (UTC);
        missing ``backends``/``dtypes`` are taken from the rows' ``backend``/``dtype`` values.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        meta = dict(meta or {})
        rows = _list(rows)
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise TypeError(f"row {i} is a {type(r).__name__}, not a dict")
        columns: dict[str, None] = {}
        for r in rows:
            for k in r:
                if not isinstance(k, str):
                    raise TypeError(f"row column {k!r} is not a string")
                columns.setdefault(k, None)

        extra = {k: v for k, v in meta.items() if k not in _KNOWN_KEYS}

        def as_list(plural: str, singular: str) -> list | None:
            v = meta.get(plural)
            if v is None:
                v = meta.get(singular)  # kept in `extra` too, so load() gives it back
            if v is None:
                vals = {str(r[singular]) for r in rows if r.get(singular) is not None}
                return sorted(vals) or None
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                return [str(v)]
            return [str(x) for x in v]

        backends = as_list("backends", "backend")
        dtypes = as_list("dtypes", "dtype")
        passed = meta.get("passed", _NOT)
        if passed is _NOT:  # not given: all rows passed, if rows say
            flags = [r["passed"] for r in rows if "passed" in r]
            passed = bool(all(bool(f) for f in flags)) if rows and len(flags) == len(rows) else None
        if passed is not None:
            item = _numpy_item(passed)
            passed = bool(item if item is not _NOT else passed)
        device = meta.get("device")
        if device is not None and not isinstance(device, str):
            device = ", ".join(map(str, device)) if isinstance(device, (_list, tuple, set)) else str(device)
        created_at = _utc_iso(meta.get("created_at"))

        def text(k):
            v = meta.get(k)
            return None if v is None else str(v)

        def js(v):
            return None if v is None else _dumps(v, strict=False, where="meta")

        record = dict(kind=kind, created_at=created_at, model=text("model"), source=text("source"),
                      source_hash=text("source_hash"), backends=js(backends), device=device, dtypes=js(dtypes),
                      git_commit=text("git_commit"), passed=None if passed is None else int(passed),
                      n_rows=len(rows), columns=js(_list(columns)), versions=js(meta.get("versions")),
                      params=js(meta.get("params")), machine=js(meta.get("machine")),
                      extra=js(extra) if extra else None)
        names = ", ".join(["run_id", *record])
        marks = ", ".join("?" * (len(record) + 1))

        def write(conn: sqlite3.Connection) -> str:
            for _ in range(5):
                run_id = secrets.token_hex(6)
                try:
                    conn.execute(f"INSERT INTO runs ({names}) VALUES ({marks})", (run_id, *record.values()))
                    break
                except sqlite3.IntegrityError:  # id collision: vanishingly rare
                    continue
            else:  # pragma: no cover
                raise RunStoreError("could not allocate a run id")
            _hook("run_row")
            # rows are serialised inside the transaction: a failure half-way rolls back the run row too
            conn.executemany("INSERT INTO run_rows (run_id, idx, data) VALUES (?, ?, ?)",
                             ((run_id, i, _dumps(r, strict=True, where=f"row {i}")) for i, r in enumerate(rows)))
            _hook("rows")
            return run_id

        return self._write(write)

    def delete(self, run_id: str) -> str:
        """Delete a run (id or unique prefix) and its rows. Returns the full id; unknown id -> KeyError."""
        def write(conn):
            rid = self._resolve(conn, run_id)
            conn.execute("DELETE FROM run_rows WHERE run_id = ?", (rid,))
            if self._has_table(conn, "run_imports"):
                conn.execute("DELETE FROM run_imports WHERE run_id = ?", (rid,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (rid,))
            return rid
        return self._write(write)

    # -- moving runs between machines -------------------------------------------------------------------------

    def _has_table(self, conn: sqlite3.Connection, name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (name,)).fetchone() is not None

    @staticmethod
    def _record(conn: sqlite3.Connection, table: str, run_id: str) -> sqlite3.Row | None:
        """The row of ``table`` (runs / run_imports) for ``run_id``, by column name; None when there is none."""
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(f"SELECT * FROM {table} WHERE run_id = ?", (run_id,)).fetchone()
        finally:
            conn.row_factory = None

    def _provenance(self, conn: sqlite3.Connection, run_id: str) -> dict | None:
        if not self._has_table(conn, "run_imports"):
            return None
        rec = self._record(conn, "run_imports", run_id)
        if rec is None:
            return None
        out = dict(rec)
        try:
            out["via"] = json.loads(out.pop("via") or "[]")
        except ValueError:
            out["via"] = []
        return out

    def export_runs(self, file: str | os.PathLike, ids: Iterable[str] | None = None) -> dict:
        """Write runs (all, or the ids/unique prefixes in ``ids``) to ``file``, a versioned JSON-lines file
        (gzip-compressed when the name ends in ``.gz``) that :meth:`import_runs` verifies and merges into
        another store. Each run carries a SHA-256 of its content and its provenance (the machine and store it
        was made in, and the stores it passed through). Written to a temporary file and renamed, so a failed
        export leaves no partial file. Returns dict(path, n_runs, checksum (of the runs' content, also in the
        file's end marker), sha256 (of the file))."""
        out_path = Path(file).expanduser()
        if out_path.exists() and out_path.is_dir():
            raise RunStoreError(f"{out_path} is a directory; pass a file name for the export")
        with contextlib.suppress(OSError):
            if out_path.exists() and os.path.samefile(out_path, self.path):
                raise RunStoreError(f"{out_path} is the results store itself; pass another file for the export")
        host = _hostname()
        header = dict(format=EXPORT_FORMAT, version=EXPORT_VERSION, exported_at=_utc_iso(), host=host,
                      store=str(self.path.resolve()), store_schema=SCHEMA_VERSION,
                      workbench=collect_versions().get("workbench"))
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
        total = hashlib.sha256()
        n = 0
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock, _open_text(tmp, "w", gz=out_path.name.endswith(".gz")) as f:
                f.write(json.dumps(header, ensure_ascii=False, separators=(",", ":")) + "\n")
                conn = self._connect()
                conn.execute("BEGIN")  # one snapshot: the export is consistent even while others write
                try:
                    if ids is None:
                        wanted = [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY seq")]
                    else:
                        wanted = _list(dict.fromkeys(self._resolve(conn, i) for i in ids))
                    for rid in wanted:
                        rec = dict(self._record(conn, "runs", rid))
                        rows = [d for _, d in conn.execute(
                            "SELECT idx, data FROM run_rows WHERE run_id = ? ORDER BY idx", (rid,))]
                        try:
                            self._parse_run(rec)
                            if len(rows) != rec["n_rows"]:
                                raise ValueError(f"{len(rows)} rows stored, {rec['n_rows']} expected")
                            record, canon_rows, digest = _canonical_run(rec, rows)
                        except ValueError as e:
                            raise RunStoreError(f"run {rid} in {self.path} is damaged ({e}); not exported") from None
                        prov = self._provenance(conn, rid)
                        if prov is None:
                            provenance = dict(origin_host=host, origin_store=header["store"], via=[])
                        else:
                            provenance = dict(origin_host=prov["origin_host"], origin_store=prov["origin_store"],
                                              via=_list(prov["via"]) + [dict(
                                                  host=prov.get("imported_on"), store=header["store"],
                                                  file=prov.get("source_file"),
                                                  imported_at=prov.get("imported_at"))])
                        line = dict(run=_portable_record(record), rows=[json.loads(r) for r in canon_rows],
                                    provenance=provenance, sha256=digest)
                        f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n")
                        total.update(digest.encode())
                        n += 1
                finally:
                    with contextlib.suppress(Exception):
                        conn.execute("COMMIT")
                f.write(json.dumps(dict(end=True, n_runs=n, sha256=total.hexdigest())) + "\n")
            os.replace(tmp, out_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return dict(path=str(out_path), n_runs=n, checksum=total.hexdigest(), sha256=_sha256_file(out_path))

    def _read_export(self, file: Path):
        """(header, iterator over verified (record, canonical rows, sha256, provenance)). Raises RunStoreError
        naming the file and line for anything that isn't a complete, intact export of a known version."""
        def bad(lineno, why):
            return RunStoreError(f"{file}: line {lineno}: {why}; nothing was imported")

        def gen():
            total = hashlib.sha256()
            n = 0
            ended = False
            seen: set[str] = set()
            with _open_text(file, "r") as f:
                first = f.readline()
                for lineno, line in enumerate(f, start=2):
                    if ended:
                        raise bad(lineno, "data after the end marker")
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise bad(lineno, f"not valid JSON ({e})") from None
                    if not isinstance(obj, dict):
                        raise bad(lineno, "not a JSON object")
                    if obj.get("end") is True:
                        if obj.get("n_runs") != n or obj.get("sha256") != total.hexdigest():
                            raise bad(lineno, f"end marker says {obj.get('n_runs')} runs (checksum "
                                      f"{str(obj.get('sha256'))[:12]}), the file holds {n} (checksum "
                                      f"{total.hexdigest()[:12]})")
                        ended = True
                        continue
                    try:
                        record, canon_rows, digest = _record_from_portable(obj.get("run"), obj.get("rows"))
                        self._parse_run(record)
                        if record["n_rows"] != len(canon_rows):
                            raise ValueError(f"{len(canon_rows)} rows given, n_rows says {record['n_rows']}")
                        if record["kind"] not in KINDS:
                            raise ValueError(f"kind {record['kind']!r} is not one of {', '.join(KINDS)}")
                    except (ValueError, TypeError, KeyError) as e:
                        raise bad(lineno, f"not a valid run ({e})") from None
                    if obj.get("sha256") != digest:
                        raise bad(lineno, f"run {record['run_id']}: content does not match its SHA-256 (the file "
                                  "was modified or damaged)")
                    if record["run_id"] in seen:
                        raise bad(lineno, f"run {record['run_id']} appears twice")
                    seen.add(record["run_id"])
                    prov = obj.get("provenance") if isinstance(obj.get("provenance"), dict) else {}
                    total.update(digest.encode())
                    n += 1
                    yield record, canon_rows, digest, prov
            if not ended:
                raise RunStoreError(f"{file}: no end marker: the export is incomplete (truncated?); nothing "
                                    "was imported")

        with _open_text(file, "r") as f:
            try:
                header = json.loads(f.readline())
            except (ValueError, EOFError, OSError) as e:
                raise RunStoreError(f"{file}: not a gemma-workbench runs export (first line: {e})") from None
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
            raise RunStoreError(f"{file}: not a gemma-workbench runs export (format "
                                f"{header.get('format') if isinstance(header, dict) else header!r:.60}, expected "
                                f"{EXPORT_FORMAT!r})")
        v = header.get("version")
        if not isinstance(v, int) or v < 1:
            raise RunStoreError(f"{file}: export version {v!r} is not valid")
        if v > EXPORT_VERSION:
            raise RunStoreError(f"{file} was written by a newer gemma-workbench (export version {v} > "
                                f"{EXPORT_VERSION}); upgrade gemma-workbench to import it")
        return header, gen()

    def _local_digest(self, conn: sqlite3.Connection, run_id: str) -> str | None:
        rec = self._record(conn, "runs", run_id)
        if rec is None:
            return None
        rows = [d for _, d in conn.execute("SELECT idx, data FROM run_rows WHERE run_id = ? ORDER BY idx",
                                           (run_id,))]
        try:
            return _canonical_run(dict(rec), rows)[2]
        except ValueError:
            return "damaged"

    def import_runs(self, file: str | os.PathLike) -> dict:
        """Merge the runs of an export (:meth:`export_runs`) into this store. The whole file is verified first
        (format and version, every run's SHA-256, the end marker's count and checksum); a run already here
        with the same content is skipped (importing a file twice adds nothing), a run whose id is here with
        *different* content refuses the import. New runs are written with their provenance (origin host and
        store, the file and its SHA-256, when and where imported), in transactions of up to 200 runs: an
        interrupted import keeps whole runs only, and running it again completes it.
        Returns dict(added=[ids], present=[ids], file, sha256)."""
        src = Path(file).expanduser()
        if not src.is_file():
            raise RunStoreError(f"{src}: no such export file")
        with contextlib.suppress(OSError):
            if os.path.samefile(src, self.path):
                raise RunStoreError(f"{src} is this results store itself, not an export")
        self._writer()  # a read-only store says so before any work
        file_sha = _sha256_file(src)
        header, runs_iter = self._read_export(src)
        # pass 1: verify everything, and find what is already here
        present, conflicts, n = [], [], 0
        with self._lock:
            conn = self._connect()
            for record, _, digest, _ in runs_iter:
                n += 1
                local = self._local_digest(conn, record["run_id"])
                if local is None:
                    continue
                (present if local == digest else conflicts).append(record["run_id"])
        if conflicts:
            raise RunStoreError(f"{src}: {len(conflicts)} run id(s) are already in {self.path} with different "
                                "content: " + ", ".join(conflicts[:5]) + (", ..." if len(conflicts) > 5 else "")
                                + "; nothing was imported")
        if _sha256_file(src) != file_sha:
            raise RunStoreError(f"{src} changed while it was being read; nothing was imported")
        # pass 2: write the new runs
        added: list[str] = []
        imported_at, here = _utc_iso(), _hostname()
        _, runs_iter = self._read_export(src)
        batch: list = []

        def flush():
            if not batch:
                return

            def write(conn):
                conn.execute(_IMPORTS_TABLE)
                done = []
                for record, canon_rows, digest, prov in batch:
                    local = self._local_digest(conn, record["run_id"])
                    if local is not None:
                        if local != digest:
                            raise RunStoreError(f"{src}: run {record['run_id']} appeared in {self.path} with "
                                                "different content during the import; stopped")
                        continue
                    cols = [c for c in record if c != "seq"]
                    conn.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                 [record[c] for c in cols])
                    conn.executemany("INSERT INTO run_rows (run_id, idx, data) VALUES (?, ?, ?)",
                                     ((record["run_id"], i, r) for i, r in enumerate(canon_rows)))
                    via = prov.get("via") if isinstance(prov.get("via"), _list) else []
                    conn.execute(
                        "INSERT INTO run_imports (run_id, origin_host, origin_store, exported_at, exported_by, "
                        "source_file, source_sha256, imported_at, imported_on, via) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (record["run_id"], _str_or_none(prov.get("origin_host")) or _str_or_none(header.get("host")),
                         _str_or_none(prov.get("origin_store")) or _str_or_none(header.get("store")),
                         _str_or_none(header.get("exported_at")), _str_or_none(header.get("host")),
                         str(src.resolve()), file_sha, imported_at, here,
                         json.dumps(via, ensure_ascii=False, default=str)))
                    done.append(record["run_id"])
                return done
            added.extend(self._write(write))
            batch.clear()

        for item in runs_iter:
            if item[0]["run_id"] in present:
                continue
            batch.append(item)
            if len(batch) >= 200:
                flush()
        flush()
        return dict(added=added, present=present, file=str(src), sha256=file_sha, n_runs=n)

    # -- reading ----------------------------------------------------------------------------------------------

    def _resolve(self, conn: sqlite3.Connection, run_id: str) -> str:
        if not isinstance(run_id, str) or not run_id.strip():
            raise UnknownRunError(f"no run {run_id!r} in {self.path}")
        run_id = run_id.strip()
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
            return run_id
        hits = [r[0] for r in conn.execute(
            "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? ORDER BY created_at DESC LIMIT 6",
            (len(run_id), run_id))]
        if not hits:
            raise UnknownRunError(f"no run {run_id!r} in {self.path}")
        if len(hits) > 1:
            raise UnknownRunError(f"run id prefix {run_id!r} is ambiguous in {self.path}: matches "
                                  + ", ".join(hits[:5]) + (", ..." if len(hits) > 5 else ""))
        return hits[0]

    def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is (or uniquely starts with) ``run_id``; else KeyError."""
        with self._lock:
            return self._resolve(self._connect(), run_id)

    def _parse_run(self, rec: sqlite3.Row) -> dict:
        """Decoded run record; raises ValueError describing what is damaged."""
        out = dict(rec)
        for col in _JSON_COLUMNS:
            try:
                out[col] = _loads(rec[col])
            except (ValueError, TypeError) as e:
                raise ValueError(f"invalid JSON in column {col!r} ({e})") from None
        for col, typ in (("backends", _list), ("dtypes", _list), ("columns", _list), ("extra", dict),
                         ("versions", dict)):
            if out[col] is not None and not isinstance(out[col], typ):
                raise ValueError(f"column {col!r} holds a {type(out[col]).__name__}, not a {typ.__name__}")
        if out["columns"] is None:
            raise ValueError("column 'columns' is empty")
        try:
            out["created_at"] = _utc_iso(rec["created_at"])
        except ValueError as e:
            raise ValueError(str(e)) from None
        if not isinstance(out["n_rows"], int) or out["n_rows"] < 0:
            raise ValueError(f"n_rows is {out['n_rows']!r}")
        if out["passed"] not in (None, 0, 1):
            raise ValueError(f"passed is {out['passed']!r}")
        return out

    def _problem(self, msg: str) -> None:
        self.problems.append(msg)
        warnings.warn(msg, RunStoreWarning, stacklevel=3)

    def list(self, kind: str | None = None, model: str | None = None, limit: int | None = None):
        """One row per run, newest first, as a DataFrame with columns run_id, kind, created_at (UTC timestamp),
        model, source, source_hash, backends, device, dtypes (comma-joined), git_commit, passed, n_rows,
        machine (hostname), params (JSON string), and for runs merged in by :meth:`import_runs` origin (the
        host the run was exported from first), imported_at and imported_from (the file). ``model`` matches the model name or the source path.
        Damaged runs are skipped; each is described in ``self.problems`` (reset by each call)."""
        import pandas as pd
        self.problems = []
        where, args = [], []
        if kind is not None:
            where.append("r.kind = ?")
            args.append(kind)
        if model is not None:
            where.append("(r.model = ? OR r.source = ?)")
            args += [str(model), str(model)]
        out = []
        with self._lock:
            conn = self._connect()
            if self._has_table(conn, "run_imports"):
                prov_cols, join = ("i.origin_host AS imp_origin, i.imported_at AS imp_at, i.source_file AS imp_file",
                                   " LEFT JOIN run_imports i ON i.run_id = r.run_id")
            else:
                prov_cols, join = "NULL AS imp_origin, NULL AS imp_at, NULL AS imp_file", ""
            sql = ("SELECT r.*, (SELECT COUNT(*) FROM run_rows w WHERE w.run_id = r.run_id) AS stored_rows, "
                   + prov_cols + " FROM runs r" + join + (" WHERE " + " AND ".join(where) if where else "") +
                   " ORDER BY r.created_at DESC, r.seq DESC")
            conn.row_factory = sqlite3.Row
            try:
                for rec in conn.execute(sql, args):
                    if limit is not None and len(out) >= limit:
                        break
                    try:
                        d = self._parse_run(rec)
                        if rec["stored_rows"] != d["n_rows"]:
                            raise ValueError(f"{rec['stored_rows']} rows stored, {d['n_rows']} expected")
                    except ValueError as e:
                        self._problem(f"run {rec['run_id']}: {e}; skipped")
                        continue
                    machine = d["machine"]
                    out.append(dict(
                        run_id=d["run_id"], kind=d["kind"], created_at=d["created_at"], model=d["model"],
                        source=d["source"], source_hash=d["source_hash"],
                        backends=",".join(d["backends"] or []) or None, device=d["device"],
                        dtypes=",".join(d["dtypes"] or []) or None, git_commit=d["git_commit"],
                        passed=None if d["passed"] is None else bool(d["passed"]), n_rows=d["n_rows"],
                        machine=(machine.get("hostname") if isinstance(machine, dict) else
                                 (None if machine is None else str(machine))),
                        params=rec["params"], origin=rec["imp_origin"], imported_at=rec["imp_at"],
                        imported_from=rec["imp_file"]))
            finally:
                conn.row_factory = None
        cols = ["run_id", "kind", "created_at", "model", "source", "source_hash", "backends", "device", "dtypes",
                "git_commit", "passed", "n_rows", "machine", "params", "origin", "imported_at", "imported_from"]
        df = pd.DataFrame(out, columns=cols)
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True, format="ISO8601")
        df["imported_at"] = pd.to_datetime(df["imported_at"], utc=True, format="ISO8601")
        df["passed"] = df["passed"].astype("boolean")
        df["n_rows"] = df["n_rows"].astype("int64")
        return df

    def load(self, run_id: str) -> Run:
        """The run whose id is (or uniquely starts with) ``run_id``: Run(run_id, kind, meta, rows DataFrame).
        Unknown id -> KeyError; damaged record -> RunStoreError."""
        import pandas as pd
        with self._lock:
            conn = self._connect()
            # one read transaction: a concurrent delete can't leave us half a run
            conn.execute("BEGIN")
            try:
                rid = self._resolve(conn, run_id)
                rec = self._record(conn, "runs", rid)
                if rec is None:
                    raise UnknownRunError(f"no run {run_id!r} in {self.path}")
                raw = conn.execute("SELECT idx, data FROM run_rows WHERE run_id = ? ORDER BY idx",
                                   (rid,)).fetchall()
                provenance = self._provenance(conn, rid)
            finally:
                conn.row_factory = None
                conn.execute("COMMIT")
        try:
            d = self._parse_run(rec)
        except ValueError as e:
            msg = f"run {rid} in {self.path} is damaged: {e}"
            self.problems.append(msg)
            raise RunStoreError(msg) from None
        rows = []
        for idx, data in raw:
            try:
                r = _loads(data)
                if not isinstance(r, dict):
                    raise ValueError(f"a {type(r).__name__}, not an object")
            except (ValueError, TypeError) as e:
                msg = f"run {rid} in {self.path} is damaged: row {idx} is not valid ({e})"
                self.problems.append(msg)
                raise RunStoreError(msg) from None
            rows.append(r)
        if len(rows) != d["n_rows"] or [i for i, _ in raw] != _list(range(len(raw))):
            msg = f"run {rid} in {self.path} is damaged: {len(rows)} rows stored, {d['n_rows']} expected"
            self.problems.append(msg)
            raise RunStoreError(msg)
        columns = _list(d["columns"])
        for r in rows:  # columns not in the saved list (shouldn't happen) go last rather than vanish
            for k in r:
                if k not in columns:
                    columns.append(k)
        frame = pd.DataFrame.from_records(rows, columns=columns) if rows else pd.DataFrame(columns=columns)
        meta: dict[str, Any] = {}
        for k in _SCALAR_KEYS:
            meta[k] = d[k]
        meta.update(backends=d["backends"], dtypes=d["dtypes"],
                    passed=None if d["passed"] is None else bool(d["passed"]), created_at=d["created_at"])
        for k in _JSON_KEYS:
            meta[k] = d[k]
        meta.update(d["extra"] or {})
        return Run(run_id=rid, kind=d["kind"], meta=meta, rows=frame, provenance=provenance, records=rows)

    def __contains__(self, run_id: str) -> bool:
        try:
            self.resolve(run_id)
            return True
        except KeyError:
            return False

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # -- benchmarks -------------------------------------------------------------------------------------------

    BENCH_KEYS = ("backend", "dtype", "prompt_len", "gen_len", "batch_size")

    def compare_bench(self, run_id: str, baseline_id: str, threshold: float = 0.05, on=None):
        """Bench rows of ``run_id`` next to those of ``baseline_id``, joined on the key columns both have
        (backend, dtype, prompt_len, gen_len, batch_size; or ``on``). For every numeric metric present in both
        there are columns ``<m>`` (this run), ``<m>_base`` and ``<m>_ratio`` (this / baseline). ``regression``
        is True where a throughput (``*tok_s``: decode_tok_s, prefill_tok_s ...) is lower than the baseline's by
        more than ``threshold`` (0.05 = 5 %); ``regressed`` names those metrics. Rows in one run only are kept
        with ``status`` 'new' or 'missing'. Repeated keys are reduced to their median first."""
        import pandas as pd
        cur, base = self.load(run_id), self.load(baseline_id)
        for r in (cur, base):
            if r.kind != "bench":
                raise ValueError(f"run {r.run_id} is a {r.kind} run, not a bench run")
        a, b = cur.rows, base.rows
        keys = [k for k in (on or self.BENCH_KEYS) if k in a.columns and k in b.columns]
        if not keys:
            raise ValueError(f"runs {cur.run_id} and {base.run_id} share no key columns "
                             f"({', '.join(on or self.BENCH_KEYS)})")

        def numeric(df):
            return [c for c in df.columns if c not in keys and pd.api.types.is_numeric_dtype(df[c])
                    and not pd.api.types.is_bool_dtype(df[c])]
        metrics = [c for c in numeric(a) if c in numeric(b)]

        def reduce(df):
            df = df[keys + metrics]
            if df.duplicated(keys).any():
                df = df.groupby(keys, dropna=False, sort=False, as_index=False)[metrics].median()
            return df.reset_index(drop=True)

        m = reduce(a).merge(reduce(b), on=keys, how="outer", suffixes=("", "_base"), indicator=True, sort=False)
        m["status"] = m.pop("_merge").map({"both": "both", "left_only": "new", "right_only": "missing"}
                                          ).astype(str)
        ordered = _list(keys)
        for c in metrics:
            num, den = m[c].astype("float64"), m[c + "_base"].astype("float64")
            ratio = num / den.where(den != 0)
            m[c + "_ratio"] = ratio
            ordered += [c, c + "_base", c + "_ratio"]
        throughput = [c for c in metrics if c.endswith("tok_s")]
        flags = pd.DataFrame({c: (m[c + "_ratio"] < 1.0 - threshold).fillna(False).astype(bool)
                              for c in throughput}, index=m.index)
        m["regression"] = flags.any(axis=1) if throughput else False
        m["regressed"] = [",".join(c for c in throughput if flags.at[i, c]) for i in m.index] if throughput else ""
        m = m[ordered + ["regression", "regressed", "status"]]
        m.attrs.update(run_id=cur.run_id, baseline_id=base.run_id, threshold=threshold, keys=keys)
        return m


# --------------------------------------------------------------------------------------------------------------
# export files

EXPORT_FORMAT = "gemma-workbench-runs"
EXPORT_VERSION = 1

# columns of `runs` an export carries (seq is local to each store)
_RECORD_COLUMNS = ("run_id", "kind", "created_at", "model", "source", "source_hash", "backends", "device",
                   "dtypes", "git_commit", "passed", "n_rows", "columns", "versions", "params", "machine", "extra")


def _hostname() -> str:
    try:
        return socket.gethostname()
    except Exception:  # pragma: no cover
        return "unknown"


def _str_or_none(v) -> str | None:
    return None if v is None else str(v)


def _canon_json(s: str) -> str:
    """One spelling of a stored JSON text (what _dumps writes), so equal content has equal bytes."""
    return json.dumps(json.loads(s), ensure_ascii=False, separators=(",", ":"))


def _canonical_run(rec: dict, rows: Iterable[str]) -> tuple[dict, _list, str]:
    """(record with canonical JSON columns, canonical row texts, SHA-256 of both). ValueError if damaged."""
    record = {}
    for c in _RECORD_COLUMNS:
        v = rec.get(c)
        if c in _JSON_COLUMNS and v is not None:
            if not isinstance(v, str):
                raise ValueError(f"column {c!r} is a {type(v).__name__}, not JSON text")
            try:
                v = _canon_json(v)
            except ValueError as e:
                raise ValueError(f"invalid JSON in column {c!r} ({e})") from None
        record[c] = v
    canon_rows = []
    for i, r in enumerate(rows):
        try:
            t = _canon_json(r)
        except (ValueError, TypeError) as e:
            raise ValueError(f"row {i} is not valid JSON ({e})") from None
        if not t.startswith("{"):
            raise ValueError(f"row {i} is not an object")
        canon_rows.append(t)
    blob = json.dumps([record, canon_rows], ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return record, canon_rows, hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _portable_record(record: dict) -> dict:
    """A canonical record for an export line: JSON columns as JSON values, not text."""
    return {c: (json.loads(v) if c in _JSON_COLUMNS and v is not None else v) for c, v in record.items()}


def _record_from_portable(run, rows) -> tuple[dict, _list, str]:
    if not isinstance(run, dict):
        raise ValueError("'run' is not an object")
    if not isinstance(rows, _list):
        raise ValueError("'rows' is not a list")
    missing = [c for c in ("run_id", "kind", "created_at", "n_rows", "columns") if c not in run]
    if missing:
        raise ValueError("missing " + ", ".join(missing))
    unknown = sorted(set(run) - set(_RECORD_COLUMNS))
    if unknown:
        raise ValueError("unknown field(s) " + ", ".join(unknown))
    rid = run["run_id"]
    if not isinstance(rid, str) or not rid.strip() or len(rid) > 64 or rid != rid.strip():
        raise ValueError(f"run_id {rid!r} is not valid")
    for c in ("kind", "created_at", "model", "source", "source_hash", "device", "git_commit"):
        if run.get(c) is not None and not isinstance(run[c], str):
            raise ValueError(f"{c} is a {type(run[c]).__name__}, not a string")
    if not isinstance(run["n_rows"], int) or isinstance(run["n_rows"], bool):
        raise ValueError(f"n_rows {run['n_rows']!r} is not a whole number")
    if run.get("passed") not in (None, 0, 1) or isinstance(run.get("passed"), float):
        raise ValueError(f"passed {run.get('passed')!r} is not 0, 1 or null")
    as_text = {}
    for c in _RECORD_COLUMNS:
        v = run.get(c)
        if c in _JSON_COLUMNS and v is not None:
            v = json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        as_text[c] = v
    texts = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"row {i} is not an object")
        texts.append(json.dumps(r, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    return _canonical_run(as_text, texts)


def _open_text(path: Path, mode: str, gz: bool | None = None):
    import gzip
    if gz if gz is not None else str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def _sha256_file(path: Path) -> str:
    from .weights.registry import sha256_file
    return sha256_file(path)


# --------------------------------------------------------------------------------------------------------------
# module-level conveniences


def list(kind: str | None = None, model: str | None = None, db: str | os.PathLike | None = None,  # noqa: A001
         limit: int | None = None):
    """:meth:`RunStore.list` over ``RunStore(db)``; damaged runs are skipped with a RunStoreWarning."""
    with RunStore(db) as st:
        return st.list(kind=kind, model=model, limit=limit)


def load(run_id: str, db: str | os.PathLike | None = None) -> Run:
    """:meth:`RunStore.load` over ``RunStore(db)``."""
    with RunStore(db) as st:
        return st.load(run_id)


def compare_bench(run_id: str, baseline_id: str, threshold: float = 0.05, db: str | os.PathLike | None = None):
    """:meth:`RunStore.compare_bench` over ``RunStore(db)``."""
    with RunStore(db) as st:
        return st.compare_bench(run_id, baseline_id, threshold=threshold)


def export_runs(file: str | os.PathLike, ids: Iterable[str] | None = None, db: str | os.PathLike | None = None
                ) -> dict:
    """:meth:`RunStore.export_runs` of ``RunStore(db, readonly=True)`` (exporting writes nothing to the store)."""
    with RunStore(db, readonly=True) as st:
        return st.export_runs(file, ids=ids)


def import_runs(file: str | os.PathLike, db: str | os.PathLike | None = None) -> dict:
    """:meth:`RunStore.import_runs` into ``RunStore(db)``."""
    with RunStore(db) as st:
        return st.import_runs(file)
