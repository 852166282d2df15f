#!/usr/bin/env python3
"""Look at a sweep in MLflow's own UI, as a person would: start `mlflow server` on a free 127.0.0.1 port over a
sweep's SQLite store, take headless Chromium screenshots of the experiment page and of its runs, end the server.

    tools/check_mlflow_ui.py --db results/mlflow.db --experiment compare [--out /tmp/ui]

Needs a Chromium binary (Debian: apt-get install chromium); not part of the package or CI. Prints the PNG paths;
open them and check that the page shows the Runs table (not the GenAI traces view), readable run names, and stopped
trials without a failure mark. Exit status 2 when the store, the experiment or the browser is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    with open(log, "w") as f:
        # own process group, so that its uvicorn worker ends with it
        proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                                 "1", "--backend-store-uri", f"sqlite:///{db.resolve()}"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not start; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def experiment_and_stopped_run(port: int, name: str) -> tuple[str, str | None]:
    """The experiment's id and one trial stopped early (None when no trial was)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{port}")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise LookupError(f"no MLflow experiment {name!r} in the store")
    stopped = client.search_runs([exp.experiment_id], "tags.status = 'stopped'", max_results=1)
    return exp.experiment_id, stopped[0].info.run_id if stopped else None


def screenshot(browser: str, url: str, png: Path, wait_ms: int) -> None:
    """One page, headless, in a fresh profile (no cached workflow choice: what a first visitor sees)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, type=Path, help="the sweep's SQLite MLflow store (RESULTS_DIR/mlflow.db)")
    p.add_argument("--experiment", required=True, help="experiment = sweep name")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the screenshots (default: a new folder under the system's temp dir, never the "
                        "repository)")
    p.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    p.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets to load")
    args = p.parse_args(argv)
    if not args.db.is_file():
        print(f"check_mlflow_ui: error: --db {args.db}: no such file", file=sys.stderr)
        return 2
    if shutil.which(args.browser) is None:
        print(f"check_mlflow_ui: error: --browser {args.browser!r} not found (apt-get install chromium)",
              file=sys.stderr)
        return 2
    args.out = args.out or Path(tempfile.mkdtemp(prefix="mlflow_ui_"))
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(args.db, port, args.out / "server.log")
    try:
        try:
            eid, stopped = experiment_and_stopped_run(port, args.experiment)
        except LookupError as e:
            print(f"check_mlflow_ui: error: --experiment: {e}", file=sys.stderr)
            return 2
        base = f"http://127.0.0.1:{port}/#/experiments/{eid}"
        ml = "workflowType=machine_learning"  # the UI's GenAI / Model training switch, as a link sets it
        trials = "searchFilter=" + urllib.parse.quote("tags.run_kind = 'trial'")  # the children, unnested
        pages = {"experiment": base, "runs": f"{base}/runs", "experiment_ml": f"{base}?{ml}",
                 "trials_ml": f"{base}/runs?{ml}&{trials}"}
        if stopped:
            pages["stopped_trial"] = f"{base}/runs/{stopped}?{ml}"
        for name, url in pages.items():
            png = args.out / f"{name}.png"
            screenshot(args.browser, url, png, args.wait_ms)
            print(f"{url} -> {png}")
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
