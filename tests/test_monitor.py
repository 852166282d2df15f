"""The live table and trials.csv of SweepMonitor: column names, order and rounding (trials here are plain
objects with Ray's trial attributes; the whole callback runs in real sweeps in test_sweep.py)."""

from __future__ import annotations

import io
import types

from ncssl_tune.naming import config_id
from ncssl_tune.spec import CollapseStopConfig
from ncssl_tune.sweep.monitor import SweepMonitor, read_trials


def trial(tid: str, config: dict):
    return types.SimpleNamespace(trial_id=tid, config=config, last_result=None, status="RUNNING",
                                 error_file=None)


def result(epoch: int, method: str, **metrics):
    return {"epoch": epoch, "method": method, "status": "running", "effective_rank": 7.123456789,
            "knn_acc": 0.9972222447395325, "probe_acc": 0.5, "loss": 1.0 / 3, **metrics}


def test_table_names_each_parameter_once_and_rounds(tmp_path):
    out = io.StringIO()
    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, stream=out)
    # compare.yaml's space: two `lam`s under different methods, and the method itself sampled
    vic = trial("aaaa0001", {"loss.method": "vicreg", "loss.vicreg.lam": 25.123456, "train.lr": 0.0031234})
    bt = trial("bbbb0002", {"loss.method": "barlow_twins", "loss.barlow_twins.lam": 0.0012345, "train.lr": 0.001})
    mon.on_trial_result(0, [vic, bt], vic, result(1, "vicreg"))
    mon.print_table([vic, bt], force=True)
    head, *rows = out.getvalue().strip().splitlines()
    assert head.split() == ["trial", "method", "barlow_twins.lam", "vicreg.lam", "lr", "epoch", "eff_rank", "knn",
                            "probe", "status"]
    assert rows[0].split() == ["aaaa0001", "vicreg", "-", "25.1", "0.00312", "1", "7.12", "0.997", "0.5",
                               "running"]
    # a trial without a result yet: its method from its config, its status from Ray
    assert rows[1].split() == ["bbbb0002", "barlow_twins", "0.00123", "-", "0.001", "-", "-", "-", "-",
                               "running"]
    assert "0.9972222447395325" not in out.getvalue()


def test_csv_puts_parameters_before_metrics_at_full_precision(tmp_path):
    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, stream=io.StringIO())
    first = trial("aaaa0001", {"loss.method": "vicreg", "train.lr": 0.0031234})
    late = trial("bbbb0002", {"loss.method": "barlow_twins", "loss.barlow_twins.lam": 0.0012345, "train.lr": 0.001})
    for t, method in ((first, "vicreg"), (late, "barlow_twins")):  # late's lam appears after first's metrics
        t.last_result = result(2, method)
        mon.on_trial_result(0, [first, late], t, t.last_result)
        mon.on_trial_complete(0, [first, late], t)
    rows = read_trials(tmp_path)
    cols = list(rows[0])
    assert cols[:5] == ["trial_id", "method", "status", "stop_reason", "config_id"]
    assert cols[5:8] == ["param.loss.barlow_twins.lam", "param.loss.method", "param.train.lr"]
    assert cols[8:10] == ["epoch", "loss"] and "knn_acc" in cols[10:]
    assert [r["config_id"] for r in rows] == [config_id(first.config), config_id(late.config)]
    assert rows[0]["knn_acc"] == "0.9972222447395325" and rows[1]["param.loss.barlow_twins.lam"] == "0.0012345"
    assert [r["status"] for r in rows] == ["stopped", "stopped"]
