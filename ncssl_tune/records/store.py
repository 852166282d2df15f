"""Where MLflow writes: the default store, and checks that a tracking URI is usable before any trial starts."""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import urlparse

DB_SCHEMES = ("postgresql", "mysql", "mssql")

log = logging.getLogger(__name__)


class TrackingError(ValueError):
    """The tracking store cannot be used; str() names the URI and what to fix."""


def _not_schema_setup(record: logging.LogRecord) -> bool:
    # MLflow announces at INFO that it creates or migrates the tables of a new SQLite store, on the console, in the
    # middle of the sweep's live output; a new store is the normal case (the default one is created on first use).
    # Warnings and errors of these loggers still pass.
    return record.levelno > logging.INFO


# mlflow.store.db.utils: "Creating initial MLflow database tables...", "Updating database tables"; alembic prints
# its migration steps when its logging is configured (it is not, under MLflow 3's defaults).
_SCHEMA_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def quiet_store_setup() -> None:
    """Drop the INFO lines MLflow and alembic print when they set up a store's tables (filters on the loggers
    that emit them, so MLflow's handler never sees them). Called by every command that opens a store."""
    for name in _SCHEMA_LOGGERS:
        logging.getLogger(name).addFilter(_not_schema_setup)  # the same function is not added twice


def warm_store(uri: str) -> None:
    """Open the store once, as the sweep's first write would: MLflow's imports and, for a new SQLite file, its
    tables (~5 s on 2 cores). MLflow keeps the opened store per URI, so run_sweep does this on a thread while Ray
    starts and the tracker's first write finds it ready. Errors are left to that write (it reports them)."""
    quiet_store_setup()
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - the tracker meets the same error and reports it
        log.debug("warming the store %s: %s", uri, e)


def default_tracking_uri(results_dir: str | Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve()}/mlflow.db"


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError unless `uri` names a store this process can record into. Asks the store on every
    call: each command calls it once, at its start (cli.py; run_sweep and run_analysis for Python callers)."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme == "file":
        _check_folder(uri, Path(urlparse(uri).path))
    elif scheme in DB_SCHEMES:
        _check_database(uri, timeout_s)
    else:
        raise TrackingError(f"tracking URI {uri!r}: unsupported scheme {scheme or '(none)'!r}; use "
                            f"sqlite:///PATH/mlflow.db (a local file), http(s)://HOST:PORT (an `mlflow server`), "
                            f"file:///PATH, or {', '.join(s + '://...' for s in DB_SCHEMES)}")


def _check_server(uri: str, timeout_s: float) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    fix = ("start it (mlflow server --host 127.0.0.1 --port 5000) or pass --tracking-uri "
           "sqlite:///PATH/mlflow.db to record into a local file")
    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            max_retries=0, timeout=timeout_s, raise_on_status=False, params={"max_results": 1})
    except MlflowException as e:
        text = str(e)
        why = ("connection refused" if "refused" in text.lower() else
               f"no answer within {timeout_s:g} s" if "timed out" in text.lower() else text.split(" with exception ")[-1][:300])
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({why}); {fix}") from None
    if resp.status_code in (401, 403):
        raise TrackingError(f"MLflow tracking server {uri} refused access (HTTP {resp.status_code}); set "
                            f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if resp.status_code != 200:
        raise TrackingError(f"{uri} does not answer like an MLflow tracking server (HTTP {resp.status_code} for "
                            f"/api/2.0/mlflow/experiments/search); check the host, port and path, or {fix}")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the cwd with three slashes, absolute with four)."""
    if urlparse(uri).scheme != "sqlite":
        return None
    rest = uri.split("://", 1)[1]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        raise TrackingError(f"tracking URI {uri!r}: an SQLite store needs a file, e.g. "
                            f"sqlite:///results/mlflow.db (relative) or sqlite:////abs/path/mlflow.db")
    return Path(rest[1:])


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    _check_folder(uri, path.parent)
    if path.exists():
        try:
            with sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=5) as conn:
                conn.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise TrackingError(f"tracking URI {uri!r}: {path} is not a usable SQLite database ({e}); "
                                f"move it away or choose another file") from None


def _check_folder(uri: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TrackingError(f"tracking URI {uri!r}: cannot write into {folder} ({e.strerror or e}); choose a "
                            f"writable location") from None


def _check_database(uri: str, timeout_s: float) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(max(1, timeout_s))})
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:  # no driver, DNS, auth, refused
        raise TrackingError(f"tracking URI {uri!r}: cannot connect to the database ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}); check host, credentials and that its Python "
                            f"driver is installed") from None
