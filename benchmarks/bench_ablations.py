"""Collapse ablations on the default data: does each configuration land in the collapse class the papers predict?

Each row trains the base configuration of a shipped search space (search_spaces/<method>.yaml, no sampling) with
one ablation, then prints the final collapse metrics of z and h next to the downstream scores, and the reference
scores (randomly initialised encoder, raw pixels) of the same split, backbone and probes. Predictions:
- the default VICReg, Barlow Twins and W-MSE configurations: collapse `none`;
- VICReg with nu = 0 (no covariance term; Bardes et al. 2022, table 7) and Barlow Twins with lambda = 0 (no
  redundancy reduction; Zbontar et al. 2021, table 5): `dimensional`;
- invariance only, without BatchNorm (the negative control): `total`;
- the default SimSiam and BYOL configurations: `none`; SimSiam without its stop-gradient and without its predictor
  (Chen & He 2021, figure 2 and table 1) and BYOL without its predictor (Grill et al. 2020, table 5b): `total`
  (the std of the l2-normalised output -> 0).
Every default (prediction `none`) should beat the randomly initialised encoder on fewshot_acc by at least MARGIN, as
the information-maximisation methods do (`beats_random_init`, with `margin` = fewshot_acc - the random-init mean).
`--seeds 3` also runs the default VICReg with three training seeds: the noise floor of the objective.

    python benchmarks/bench_ablations.py            # full table, writes results/benchmarks/ablations.json
    python benchmarks/bench_ablations.py --quick    # 1 epoch per row: checks the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

from ncssl_tune.config import SECTIONS, TrainConfig, set_dotted
from ncssl_tune.core.train import reference_scores, train

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = [  # (row name, shipped space, dotted overrides, predicted collapse class of z)
    ("vicreg", "vicreg", {}, "none"),
    ("vicreg nu=0", "vicreg", {"loss.vicreg.nu": 0.0}, "dimensional"),
    ("barlow_twins", "barlow_twins", {}, "none"),
    ("barlow_twins lam=0", "barlow_twins", {"loss.barlow_twins.lam": 0.0}, "dimensional"),
    ("wmse", "wmse", {}, "none"),
    ("invariance, norm none", "vicreg", {"loss.method": "invariance", "model.norm": "none"}, "total"),
    ("simsiam", "simsiam", {}, "none"),
    ("simsiam no stop-grad", "simsiam", {"model.stop_grad": False}, "total"),
    ("simsiam no predictor", "simsiam", {"model.predictor": ""}, "total"),
    ("byol", "byol", {}, "none"),
    ("byol no predictor", "byol", {"model.predictor": ""}, "total"),
]
DIAGNOSTICS = [  # rows that explain another row's outcome; benchmarked, not calibrated in tests/test_calibration.py
    # BYOL without predictor with a target that follows the online network faster than the shipped tau_0 = 0.996
    # (over 440 steps the cosine-scheduled EMA moves the target little from its random initialisation)
    ("byol no predictor, tau 0.9", "byol", {"model.predictor": "", "model.ema_tau": 0.9}, "total"),
]
MARGIN = 0.20  # fewshot_acc above the random-init encoder that a default must reach (issue 21: as VICReg, BT, W-MSE)
COLUMNS = ("collapse", "effective_rank", "effective_rank_h", "effective_rank_frac", "avg_corr", "avg_corr_h",
           "entropy", "std_l2", "fewshot_acc", "fewshot_acc_std", "knn_acc", "probe_acc")


def base_config(space: str, overrides: dict, epochs: int | None = None, threads: int = 1) -> TrainConfig:
    """The base training configuration of search_spaces/<space>.yaml with dotted overrides applied.

    One torch thread by default: on a busy 2-core machine two OpenMP threads spin against each other and a run
    takes 10-50x longer; this benchmark measures collapse and accuracy, not speed."""
    raw = yaml.safe_load((ROOT / "search_spaces" / f"{space}.yaml").read_text())
    d = {k: raw[k] for k in SECTIONS if k in raw}
    for key, value in {**overrides, "train.threads": threads, **({"train.epochs": epochs} if epochs else {})}.items():
        set_dotted(d, key, value)
    return TrainConfig.from_dict(d)


def row(name: str, cfg: TrainConfig, predicted: str) -> dict:
    t0 = time.perf_counter()
    last = train(cfg)
    out = {"name": name, "predicted": predicted, "seed": cfg.train.seed, "epochs": last.get("epoch"),
           "status": last.get("status"), "seconds": round(time.perf_counter() - t0, 1)}
    out |= {k: last.get(k) for k in COLUMNS}
    out["as_predicted"] = out["collapse"] == predicted
    print(f"{name}: " + ", ".join(f"{k} {fmt(out[k])}" for k in ("collapse", *COLUMNS[1:], "seconds")), flush=True)
    return out


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch per row, one seed: plumbing only")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of the default VICReg (noise floor)")
    ap.add_argument("--only", nargs="*", help="run only these rows (by name)")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "ablations.json"))
    args = ap.parse_args(argv)
    epochs = 1 if args.quick else None
    rows = [row(name, base_config(space, ov, epochs), pred) for name, space, ov, pred in ABLATIONS + DIAGNOSTICS
            if not args.only or name in args.only]
    for seed in range(1, args.seeds if not (args.quick or args.only) else 1):
        rows.append(row(f"vicreg seed={seed}", base_config("vicreg", {"train.seed": seed}, epochs), "none"))
    ref = reference_scores(base_config("vicreg", {}, epochs))
    floor = ref["random_init"]["fewshot_acc"]  # every shipped digits space has the same 16-wide small_cnn and split
    for r in rows:
        r["margin"] = r["fewshot_acc"] - floor
        r["beats_random_init"] = r["margin"] >= MARGIN if r["predicted"] == "none" else None
    print("| " + " | ".join(("row", "predicted", *COLUMNS, "margin")) + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for r in rows:
        print("| " + " | ".join(fmt(r[k]) for k in ("name", "predicted", *COLUMNS, "margin")) + " |")
    for kind, scores in ref.items():
        print(f"reference {kind}: " + ", ".join(f"{k} {fmt(v)}" for k, v in scores.items()
                                                 if k in ("fewshot_acc", "knn_acc", "probe_acc")))
    seeds = [r["fewshot_acc"] for r in rows if r["name"] == "vicreg" or r["name"].startswith("vicreg seed=")]
    if len(seeds) > 1:
        print(f"noise floor: fewshot_acc over {len(seeds)} seeds of the default VICReg: "
              f"{min(seeds):.3f}-{max(seeds):.3f} (range {max(seeds) - min(seeds):.3f})")
    missed = [r["name"] for r in rows if not r["as_predicted"] or r["beats_random_init"] is False]
    print("all rows as predicted" if not missed else f"not as predicted: {', '.join(missed)}")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
           "rows": rows, "reference": ref, "margin_required": MARGIN, "seed_range": max(seeds) - min(seeds) if len(seeds) > 1 else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
