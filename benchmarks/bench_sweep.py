"""The default sweep on 2 CPU cores: `ncssl-sweep search_spaces/vicreg.yaml` as shipped.

Prints wall time (target < 5 minutes with >= 12 trials), how many trials ran to the end or were stopped, and
the spread of final effective ranks (the sweep should contain collapsed and healthy configurations).
Writes results/benchmarks/sweep.json. `--quick` runs 2 trials x 1 epoch (what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from ncssl_tune.spec import load_spec
from ncssl_tune.sweep import timed_sweep


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 trials x 1 epoch, for the test suite")
    p.add_argument("--space", default=str(Path(__file__).resolve().parent.parent / "search_spaces/vicreg.yaml"))
    p.add_argument("--out", default="results/benchmarks/sweep.json")
    args = p.parse_args(argv)
    quick = {"num_samples": 2, "epochs": 1} if args.quick else {}
    spec = load_spec(args.space, **quick)
    wall, rows = timed_sweep(spec)
    ranks = sorted(float(r["effective_rank"]) for r in rows if r.get("effective_rank"))
    statuses = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
           "space": Path(args.space).name, "trials": len(rows), "wall_seconds": wall, "statuses": statuses,
           "effective_rank_min": ranks[0] if ranks else None, "effective_rank_max": ranks[-1] if ranks else None,
           "effective_ranks": ranks, "collapsed_total": sum(r.get("collapse") == "total" for r in rows)}
    print(f"{len(rows)} trials in {wall:.0f} s (target: >= 12 trials in < 300 s); statuses {statuses}")
    if ranks:
        print(f"final effective rank from {ranks[0]:.1f} to {ranks[-1]:.1f}; "
              f"{out['collapsed_total']} trials ended in total collapse")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
