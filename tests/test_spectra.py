"""A trial's spectra as files: the long CSV, its two plots, the driver-side history, and a real sweep that leaves
them on every child run however the trial ended."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ncssl_tune.records.spectra import (
    SPECTRUM_CSV,
    SPECTRUM_EPOCHS_PNG,
    SPECTRUM_PNG,
    SpectrumHistory,
    read_spectra_csv,
    read_spectrum_csv,
    write_spectra_csv,
    write_trial_spectra,
)

# Values that a short decimal form would not round-trip (the CSV must keep every bit).
Z1, H1 = [2.0 / 3.0, 1e-300, 0.0], [np.pi, np.e / 7]
Z2, H2 = [5.0, 1.0 / 3.0, 1e-9], [1.0, 0.5]


def test_long_csv_round_trips_every_epoch_exactly(tmp_path):
    path = tmp_path / "s.csv"
    write_spectra_csv(path, {2: (Z2, H2), 1: (Z1, H1)})
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,k,z,h" and lines[1].startswith("1,1,") and len(lines) == 1 + 3 + 3
    assert lines[3].endswith(",0.0,")  # h is narrower than z: an empty cell, not a zero
    assert read_spectra_csv(path) == {1: {"z": Z1, "h": H1}, 2: {"z": Z2, "h": H2}}
    assert read_spectrum_csv(path) == {"z": Z2, "h": H2, "epoch": 2}  # the last epoch, named


def test_earlier_single_epoch_format_still_reads(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("k,z,h\n1,4.0,2.0\n2,1.0,0.001\n3,0.0,\n")
    assert read_spectra_csv(path) == {0: {"z": [4.0, 1.0, 0.0], "h": [2.0, 0.001]}}
    assert read_spectrum_csv(path) == {"z": [4.0, 1.0, 0.0], "h": [2.0, 0.001], "epoch": None}  # not recorded


def test_history_keeps_the_latest_replay_and_survives_a_new_driver(tmp_path):
    history = SpectrumHistory()
    history.add("t1", {"epoch": 1, "spectrum": Z1, "spectrum_h": H1}, tmp_path)
    history.add("t1", {"epoch": 2, "spectrum": [9.0, 9.0, 9.0], "spectrum_h": [9.0, 9.0]}, tmp_path)
    history.add("t1", {"epoch": 3, "status": "diverged", "loss": float("nan")}, tmp_path)  # no spectrum: skipped
    history.add("t2", {"epoch": 1, "spectrum": Z2, "spectrum_h": H2}, tmp_path)
    assert (tmp_path / "spectra" / "t1.csv").is_file()
    # a driver restarted by --resume: a new (unpickled) history, same sweep folder; epoch 2 replayed
    again = pickle.loads(pickle.dumps(SpectrumHistory()))
    again.add("t1", {"epoch": 2, "spectrum": Z2, "spectrum_h": H2}, tmp_path)
    assert again.epochs("t1", tmp_path) == {1: (Z1, H1), 2: (Z2, H2)}
    assert again.epochs("t2", tmp_path) == {1: (Z2, H2)}
    assert again.epochs("never", tmp_path) == {}


def test_a_line_cut_short_by_a_killed_driver_is_skipped_and_the_replay_kept(tmp_path, caplog):
    history = SpectrumHistory()
    history.add("t", {"epoch": 1, "spectrum": Z1, "spectrum_h": H1}, tmp_path)
    with open(history.path("t", tmp_path), "a") as f:
        f.write("2,1,7.0,7.0\n2,2,0.3")  # epoch 2's block, cut off by the kill
    # the restarted driver receives epoch 2 again (the trial replays it from its checkpoint)
    history.add("t", {"epoch": 2, "spectrum": Z2, "spectrum_h": H2}, tmp_path)
    assert history.epochs("t", tmp_path) == {1: (Z1, H1), 2: (Z2, H2)}
    assert "skipped 1 malformed line" in caplog.text


def test_history_without_a_sweep_folder_uses_its_own():
    history = SpectrumHistory()
    history.add("t", {"epoch": 1, "spectrum": Z1, "spectrum_h": H1}, None)
    path = history.path("t", None)
    try:
        assert path.is_file() and history.epochs("t", None) == {1: (Z1, H1)}
    finally:
        path.unlink()


def _image(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def test_trial_files_for_a_collapsing_trial(tmp_path):
    d = 64
    # eigenvalues decaying faster every epoch: dimensional collapse as Jing et al. draw it
    epochs = {e: (list(np.geomspace(1.0, 10.0 ** (-2 * e), d)), list(np.geomspace(2.0, 1e-3, 16))) for e in range(1, 6)}
    paths = write_trial_spectra(tmp_path, epochs, "sweep trial t: stopped (asha)")
    assert [p.name for p in paths] == [SPECTRUM_CSV, SPECTRUM_PNG, SPECTRUM_EPOCHS_PNG]
    assert read_spectra_csv(paths[0]).keys() == set(range(1, 6))
    for p in paths[1:]:
        img = _image(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img[..., :3].std() > 0.05  # drawn, not blank


def test_trial_files_when_nothing_was_measured(tmp_path):
    paths = write_trial_spectra(tmp_path, {}, "sweep trial t: diverged (non-finite loss at epoch 1)")
    assert paths[0].read_text() == "epoch,k,z,h\n" and read_spectrum_csv(paths[0]) == {"z": [], "h": [], "epoch": None}
    assert all(_image(p).ndim == 3 for p in paths[1:])


# --- a real sweep: one trial finishes, one collapses totally and is stopped, one diverges in its first epoch
# (helpers.OUTCOMES_SPACE, run once per session: conftest.outcomes_sweep)


def test_every_child_run_of_a_sweep_has_its_spectra(outcomes_sweep, tmp_path):
    from mlflow import MlflowClient

    spec, uri, result = outcomes_sweep.spec, outcomes_sweep.uri, outcomes_sweep.result
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(spec.name)
    children = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("run_kind") == "trial"]
    by_lr = {float(r.data.params["train.lr"]): r for r in children}
    assert len(children) == 3 and result.num_trials == 3
    outcome = {lr: (r.data.tags["status"], r.data.tags["stop_reason"].split(" ")[0]) for lr, r in by_lr.items()}
    assert outcome == {3e-3: ("finished", ""), 1e4: ("stopped", "collapse_total"), 1e8: ("diverged", "non-finite")}
    for lr, run in by_lr.items():
        assert {a.path for a in c.list_artifacts(run.info.run_id)} == {SPECTRUM_CSV, SPECTRUM_PNG, SPECTRUM_EPOCHS_PNG}
        epochs = read_spectra_csv(c.download_artifacts(run.info.run_id, SPECTRUM_CSV, str(tmp_path / run.info.run_id)))
        measured = sorted(m.step for m in c.get_metric_history(run.info.run_id, "effective_rank"))
        assert sorted(epochs) == measured  # a spectrum for every epoch that was measured, no more
        for spectra in epochs.values():
            assert len(spectra["z"]) == 64 and len(spectra["h"]) == 16
        assert len(epochs) == {3e-3: 3, 1e4: 2, 1e8: 0}[lr]  # finished, stopped at epoch 2, diverged in epoch 1
