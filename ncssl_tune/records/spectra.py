"""The covariance spectrum of a trial at every measured epoch, as files.

One data artifact per trial, ``spectrum.csv``, in long format: columns ``epoch, k, z, h`` (k = 1.. in descending
order of the eigenvalue; a cell is empty where one representation is narrower than the other). Beside it two plots:
``spectrum.png``, the state the trial ended in (its last measured epoch, however it ended), and
``spectrum_epochs.png``, the spectrum after every epoch, one line per epoch coloured by epoch: the picture of
Jing et al., "Understanding Dimensional Collapse in Contrastive Self-Supervised Learning", ICLR 2022 (index
against the log of the spectrum), where dimensional collapse shows as the tail falling away epoch after epoch.

`write_trial_spectra` is the whole job (per-epoch spectra in, files out), in two halves for the sweep's driver:
`stage_trial_spectra` (the CSV and the title, when a trial ends) and `draw_staged_plots` (the plots, later, on
the tracker's writer thread: drawing takes ~0.3 s a trial, which no trial should wait for). `SpectrumHistory`
gathers the spectra on the driver as results arrive. Importing this
module loads neither Ray nor matplotlib (the plots import matplotlib when drawn).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ncssl_tune.vocab import SPECTRUM_CSV, SPECTRUM_EPOCHS_PNG, SPECTRUM_PNG

TITLE_FILE = ".plot_title"  # in a staged folder: the plots are still to be drawn, with this title
HISTORY_DIR = "spectra"  # in the sweep folder: one growing CSV per trial, the source of the artifact

Spectrum = tuple[Sequence[float], Sequence[float]]  # (eigenvalues of z, eigenvalues of h), descending

log = logging.getLogger(__name__)


def _rows(epoch: int, z: Sequence[float], h: Sequence[float]) -> str:
    """One epoch's block of the long CSV, as one string (written with one call)."""
    return "".join(f"{epoch},{k + 1},{z[k] if k < len(z) else ''},{h[k] if k < len(h) else ''}\n"
                   for k in range(max(len(z), len(h))))


def write_spectra_csv(path: str | Path, epochs: Mapping[int, Spectrum]) -> None:
    """The long CSV of `epochs` (epoch -> (z, h)), epochs in increasing order."""
    with open(path, "w") as f:
        f.write("epoch,k,z,h\n")
        f.writelines(_rows(epoch, *map(list, epochs[epoch])) for epoch in sorted(epochs))


def read_spectra_csv(path: str | Path) -> dict[int, dict[str, list[float]]]:
    """epoch -> {"z": [...], "h": [...]} from a long CSV. An epoch that appears again (an epoch replayed after a
    trial was restored from an older checkpoint) keeps its latest values. A file of the earlier single-epoch
    format (columns k, z, h: the final epoch only) reads as epoch 0. A line cut short (a driver killed while
    writing it) is skipped with a warning."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        return {}
    with_epoch = lines[0].split(",")[0] == "epoch"
    out: dict[int, dict[str, list[float]]] = {}
    bad = 0
    for line in lines[1:]:
        try:
            cells = line.split(",")
            epoch, (k, z, h) = (int(cells[0]), cells[1:]) if with_epoch else (0, cells)
            values = (float(z) if z else None, float(h) if h else None)
        except ValueError:
            bad += 1
            continue
        if k == "1" or epoch not in out:  # k = 1 starts an epoch's block; a replayed block replaces the first
            out[epoch] = {"z": [], "h": []}
        for name, v in zip(("z", "h"), values):
            if v is not None:
                out[epoch][name].append(v)
    if bad:
        log.warning("%s: skipped %d malformed line(s), e.g. one cut short by a killed driver", path, bad)
    return out


def read_spectrum_csv(path: str | Path) -> dict[str, Any]:
    """{"z": [...], "h": [...], "epoch": E} of the last epoch in `path` (empty lists when no epoch was measured).
    E is that epoch, which the plots name (a trial stopped early has its spectrum from then); None when the file
    does not say (the single-epoch format, or nothing measured)."""
    epochs = read_spectra_csv(path)
    if not epochs:
        return {"z": [], "h": [], "epoch": None}
    last = max(epochs)
    return {**epochs[last], "epoch": last or None}


def plot_spectra(ax, curves: dict[str, Sequence[float]], legend: bool = True, **line) -> list[str]:
    """Eigenvalues against their index on a log y axis; zeros (below float precision) are left out. `line`:
    matplotlib line properties (e.g. color). Returns the labels of the curves with no positive eigenvalue (a
    totally collapsed representation), which a log axis cannot show."""
    from matplotlib.ticker import MaxNLocator, NullLocator

    empty = []
    for label, values in curves.items():
        pts = [(k + 1, v) for k, v in enumerate(values) if v > 0 and math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), label=label, **{"lw": 1.2, **line})
        else:
            empty.append(label)
    ax.set_yscale("log")
    # No minor ticks: a collapsed spectrum spans ~20 decades, and its ~9 minor ticks per decade (each a Tick
    # object with a grid line) made these plots cost the driver ~1 s per trial; one grid line per decade remains.
    ax.yaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index k (descending)")
    ax.set_ylabel("eigenvalue of covariance")
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return empty


def _figure(ncols: int, width: float):
    from matplotlib.figure import Figure  # Figure without pyplot: the Agg canvas, no global state

    fig = Figure(figsize=(width * ncols, 3.8), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _note(ax, text: str) -> None:
    if not ax.get_lines():  # nothing drawn: no empty log scale
        ax.set_yscale("linear")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.6"})


def _wrap(title: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def save_spectrum_png(path: str | Path, z: Sequence[float] | None, h: Sequence[float] | None, title: str) -> None:
    """The final-state plot: the spectra of z and h of one epoch."""
    fig, (ax,) = _figure(1, 5.2)
    if z or h:
        empty = plot_spectra(ax, {f"z (D={len(z or [])})": z or [], f"h (F={len(h or [])})": h or []})
        if empty:
            _note(ax, "\n".join(f"{label}: every eigenvalue is 0 (total collapse)" for label in empty))
    else:
        _note(ax, "no spectrum was measured")
    ax.set_title(_wrap(title, 70), fontsize=9)
    fig.savefig(path, dpi=110)


def save_spectrum_epochs_png(path: str | Path, epochs: Mapping[int, Spectrum], title: str) -> None:
    """The spectrum after every epoch, z and h side by side, one line per epoch coloured by epoch."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2, 4.8)
    order = sorted(epochs)
    norm = Normalize(vmin=min(order, default=0), vmax=max(max(order, default=1), min(order, default=0) + 1))
    cmap = colormaps["viridis"]
    for i, (ax, name) in enumerate(zip(axes, ("z (projector output)", "h (representation)"))):
        # no legend: the colour bar names the epochs
        zero = [str(e) for e in order if plot_spectra(ax, {str(e): epochs[e][i]}, legend=False,
                                                       color=cmap(norm(e)), lw=1.0)]
        if not order:
            _note(ax, "no spectrum was measured")
        elif zero:
            _note(ax, f"every eigenvalue is 0 (total collapse)\nafter epoch {_ranges(zero)}")
        ax.set_title(name, fontsize=9)
    if order:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="epoch")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    fig.suptitle(_wrap(title, 140), fontsize=9)
    fig.savefig(path, dpi=110)


def _ranges(epochs: list[str]) -> str:
    """["1", "2", "3", "5"] -> "1-3, 5"."""
    out: list[list[int]] = []
    for e in map(int, epochs):
        if out and e == out[-1][-1] + 1:
            out[-1] = [out[-1][0], e]
        else:
            out.append([e])
    return ", ".join("-".join(map(str, r)) for r in out)


def write_trial_spectra(out_dir: str | Path, epochs: Mapping[int, Spectrum], title: str) -> list[Path]:
    """A trial's spectra as files: `epochs` maps each measured epoch to (eigenvalues of z, eigenvalues of h);
    writes SPECTRUM_CSV, SPECTRUM_PNG (the last epoch) and SPECTRUM_EPOCHS_PNG into out_dir and returns their
    paths. `title` heads both plots (trial, how it ended). No epoch at all (a trial that diverged or failed
    before its first measurement) still gives the three files: a CSV of its header and plots saying so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / SPECTRUM_CSV, out / SPECTRUM_PNG, out / SPECTRUM_EPOCHS_PNG]
    write_spectra_csv(paths[0], epochs)
    last = max(epochs, default=None)
    z, h = epochs[last] if last is not None else ([], [])
    save_spectrum_png(paths[1], z, h, f"{title}\nspectrum after epoch {last}" if last is not None else title)
    save_spectrum_epochs_png(paths[2], epochs, title)
    return paths


def stage_trial_spectra(out_dir: str | Path, epochs: Mapping[int, Spectrum], title: str) -> None:
    """The cheap half of `write_trial_spectra`: SPECTRUM_CSV and the plots' title (TITLE_FILE) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_spectra_csv(out / SPECTRUM_CSV, epochs)
    (out / TITLE_FILE).write_text(title)


def draw_staged_plots(out_dir: str | Path) -> None:
    """The other half: the two plots of a folder `stage_trial_spectra` wrote, drawn from its CSV; then the title
    file goes, so that the folder holds the three files of `write_trial_spectra`. A folder without a title file
    (drawn already) is left as it is."""
    out = Path(out_dir)
    if not (out / TITLE_FILE).is_file():
        return
    epochs = {e: (v["z"], v["h"]) for e, v in read_spectra_csv(out / SPECTRUM_CSV).items()}
    write_trial_spectra(out, epochs, (out / TITLE_FILE).read_text())
    (out / TITLE_FILE).unlink()


def spectrum_of(result: Mapping) -> Spectrum | None:
    """(z, h) eigenvalues carried by one trial result (keys spectrum, spectrum_h), or None if it has none."""
    z, h = result.get("spectrum"), result.get("spectrum_h")
    return (list(z or []), list(h or [])) if (z or h) else None


class SpectrumHistory:
    """Every epoch's spectra of every trial of a sweep, gathered on the driver as results arrive.

    Each trial's epochs are appended to <folder>/spectra/<trial id>.csv (the long CSV format) when its result
    arrives, so a driver restarted by --resume finds the epochs it saw before; `epochs` gives them back for
    `write_trial_spectra` when the trial ends. Without a folder (a tracker used outside a sweep folder) they go to a temporary one.
    Picklable: Ray pickles the callback that holds it.
    """

    def __init__(self) -> None:
        self._tmp: str | None = None

    def path(self, tid: str, folder: str | Path | None) -> Path:
        if folder is None:
            self._tmp = self._tmp or tempfile.mkdtemp(prefix="ncssl_spectra_")
            folder = self._tmp
        name = re.sub(r"[^\w.-]", "_", tid)  # Ray trial ids are safe already; any other id becomes one
        return Path(folder) / HISTORY_DIR / f"{name}.csv"

    def add(self, tid: str, result: Mapping, folder: str | Path | None) -> None:
        """Record the spectra of one result (nothing when it has none, e.g. a diverged epoch)."""
        spec, epoch = spectrum_of(result), result.get("epoch")
        if spec is None or not isinstance(epoch, int):
            return
        path = self.path(tid, folder)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("epoch,k,z,h\n")
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            # a driver killed mid-write leaves a line cut short: end it, so this block starts on a line of its own
            cut = f.read(1) != b"\n"
            f.write((("\n" if cut else "") + _rows(epoch, *spec)).encode())

    def epochs(self, tid: str, folder: str | Path | None) -> dict[int, Spectrum]:
        path = self.path(tid, folder)
        return {e: (s["z"], s["h"]) for e, s in read_spectra_csv(path).items()} if path.exists() else {}
