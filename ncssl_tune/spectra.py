"""The final spectrum of a trial as files: a CSV (columns k, z, h) and a log-scale plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def write_spectrum_csv(path: Path, z: Sequence[float] | None, h: Sequence[float] | None) -> None:
    z, h = list(z or []), list(h or [])
    with open(path, "w") as f:
        f.write("k,z,h\n")
        f.writelines(f"{k + 1},{z[k] if k < len(z) else ''},{h[k] if k < len(h) else ''}\n" for k in range(max(len(z), len(h))))


def read_spectrum_csv(path: str | Path) -> dict[str, list[float]]:
    """{"z": [...], "h": [...]} as written by write_spectrum_csv."""
    out: dict[str, list[float]] = {"z": [], "h": []}
    lines = Path(path).read_text().splitlines()[1:]
    for line in lines:
        _, z, h = line.split(",")
        if z:
            out["z"].append(float(z))
        if h:
            out["h"].append(float(h))
    return out


def plot_spectra(ax, curves: dict[str, Sequence[float]]) -> None:
    """Eigenvalues against their index on a log y axis; zeros (below float precision) are left out."""
    for label, values in curves.items():
        pts = [(k + 1, v) for k, v in enumerate(values) if v > 0 and math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("index k (descending)")
    ax.set_ylabel("eigenvalue of covariance")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def save_spectrum_png(path: Path, z: Sequence[float] | None, h: Sequence[float] | None, title: str) -> None:
    from matplotlib.figure import Figure  # Figure without pyplot: the Agg canvas, no global state

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    plot_spectra(ax, {f"z (D={len(z or [])})": z or [], f"h (F={len(h or [])})": h or []})
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)
