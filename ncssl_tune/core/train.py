"""The training loop: two augmented views -> encoder -> projector -> loss, collapse metrics every epoch.

Knows nothing of Ray or MLflow. `train(cfg, report)` calls `report(metrics, state)` once per epoch; `state` is a
checkpoint dict every `train.checkpoint_every` epochs (and at the end), else None. Pass a previous state as
`resume` to continue exactly where it stopped (model, optimizer, schedule position, RNG state, epoch).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ncssl_tune.config import TrainConfig, mechanisms
from ncssl_tune.core.augment import TwoViewAugment, default_augment
from ncssl_tune.core.data import ImageData, as_float, batches, load_data, own_storage
from ncssl_tune.core.evaluate import Labels, SharedEmbeddings, build_evaluators, collapse_thresholds, embed
from ncssl_tune.core.losses import LOSSES, WhiteningError
from ncssl_tune.core.mechanisms import EMATarget, two_way_loss
from ncssl_tune.core.models import SSLModel, build_backbone, build_predictor, build_projector
from ncssl_tune.core.optim import build_optimizer, lr_at

Report = Callable[[dict, "dict | None"], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_state(state: dict, path: str | os.PathLike) -> None:
    torch.save(state, path)


def load_state(path: str | os.PathLike) -> dict:
    # weights_only: a checkpoint is data, never code (safe even if the storage is shared).
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(obj: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def backbone_options(cfg: TrainConfig) -> dict:
    """Constructor options of the backbone that the config sets (only small_cnn has any)."""
    m = cfg.model
    if m.backbone != "small_cnn":
        return {}
    return {"norm": m.norm, **({"width": m.width} if m.width is not None else {})}


class _Run:
    """Everything one training run holds; built once, then stepped epoch by epoch."""

    def __init__(self, cfg: TrainConfig, data: ImageData | None = None):
        self.cfg = cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)
        d = cfg.data
        self.data = data if data is not None else load_own(cfg)
        dev = self.device
        # In memory: uint8 images go to the device as they are, a quarter of float32, and become floats a batch
        # at a time (as_float); streamed images are decoded onto the device a batch at a time.
        self.train_x, self.train_y = self.data.train_x.to(dev), self.data.train_y.to(dev)
        self.test_x, self.test_y = self.data.test_x.to(dev), self.data.test_y.to(dev)
        c, s = self.train_x.shape[1], self.train_x.shape[-1]
        self.augment = TwoViewAugment(default_augment(s, c, d.augment), s, c).to(dev)
        backbone, feat = build_backbone(cfg.model.backbone, c, s, backbone_options(cfg))
        projector, embed_dim = build_projector(feat, cfg.model.projector, cfg.model.norm)
        self.mech = mechanisms(cfg, feat)
        # built only when asked for: a run without one draws the same weights as before there were predictors
        predictor = build_predictor(embed_dim, self.mech.predictor, cfg.model.norm) if self.mech.predictor else None
        self.model = SSLModel(backbone, projector, predictor=predictor).to(dev)
        if dev.type == "cuda" and cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.model.compile and dev.type == "cuda" else self.model
        self.opt = build_optimizer(t.optimizer, self.model, t.lr, t.weight_decay)
        n = self.train_x.shape[0]
        self.batch = min(t.batch_size, n)
        self.steps_per_epoch = n // self.batch
        self.total_steps = self.steps_per_epoch * t.epochs
        self.warmup_steps = round(t.warmup_epochs * self.steps_per_epoch)
        tau0 = self.mech.ema_tau
        self.ema = None if tau0 is None else EMATarget(self.model, tau0, self.total_steps)
        g = torch.Generator().manual_seed(d.seed)
        m = min(cfg.eval.eval_samples, n)
        self.eval_idx = torch.randperm(n, generator=g)[:m].to(dev)  # fixed subset, same for every trial
        self.loss_fn = LOSSES[cfg.loss.method]
        self.loss_params = cfg.loss.params()
        self.thresholds = collapse_thresholds(cfg.eval)
        self.labels = Labels(self.train_y, self.test_y, self.data.num_classes)
        self.evaluators = build_evaluators(cfg)
        use_amp = dev.type == "cuda" and t.amp
        self.autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)
        self.epoch = 0
        self.last_probe: dict[str, float] = {}

    def close(self) -> None:
        """Drop every tensor this run holds (model, optimizer, data), and on CUDA hand the cached blocks back.

        A trial stopped by its scheduler ends inside `report` (Ray raises SystemExit there); the traceback keeps
        this run alive while the exception is handled, and a reused worker (reuse_actors) starts the next trial
        in the same process: without this, two trials' models would share the device for a while.
        """
        cuda = self.device.type == "cuda"
        for x in (getattr(self, "train_x", None), getattr(self, "test_x", None)):
            if hasattr(x, "close"):  # streamed images: their decoding threads
                x.close()
        self.__dict__.clear()
        if cuda:
            torch.cuda.empty_cache()

    def state(self) -> dict:
        """A snapshot, detached from the live tensors (state_dict() alone returns views that keep training)."""
        s = {"model": _to_cpu(self.model.state_dict()), "optimizer": _to_cpu(self.opt.state_dict()),
             "epoch": self.epoch, "cpu_rng": torch.get_rng_state(), "last_probe": dict(self.last_probe)}
        if self.device.type == "cuda":
            s["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            s["ema"] = _to_cpu(self.ema.state_dict())  # ξ and the schedule's step
        return s

    def restore(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.epoch = int(s["epoch"])
        torch.set_rng_state(s["cpu_rng"])
        if "cuda_rng" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)
        self.last_probe = dict(s.get("last_probe", {}))
        if self.ema is not None:
            if "ema" not in s:
                raise ValueError("resume: this run has an EMA target (model.ema) but the checkpoint holds none; it "
                                 "was saved by a run without one")
            self.ema.load_state_dict(s["ema"])

    def train_epoch(self) -> dict[str, float]:
        """One pass; returns the mean of every loss term. Raises FloatingPointError on a non-finite loss."""
        t = self.cfg.train
        self.model.train()
        # Batch order from its own generator keyed by (seed, epoch): a resumed run sees the same batches.
        g = torch.Generator().manual_seed(t.seed * 100003 + self.epoch)
        perm = torch.randperm(self.train_x.shape[0], generator=g)
        if isinstance(self.train_x, torch.Tensor):
            perm = perm.to(self.device)  # indexes the images where they are
        chunks = [perm[b * self.batch:(b + 1) * self.batch] for b in range(self.steps_per_epoch)]
        sums: dict[str, float] = {}
        for b, x in enumerate(batches(self.train_x, chunks)):
            step = self.epoch * self.steps_per_epoch + b
            lr = lr_at(step, self.total_steps, self.warmup_steps, t.lr, t.final_lr_frac)
            for group in self.opt.param_groups:
                group["lr"] = lr
            v1, v2 = self.augment(as_float(x))  # x: (B, C, H, W)
            if self.device.type == "cuda" and self.cfg.model.channels_last:
                v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
            terms = self.step_loss(v1, v2)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {self.epoch + 1}, step {b}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                self.ema.update(self.model, step)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        return {k: v / self.steps_per_epoch for k, v in sums.items()}

    def step_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one batch of views v1, v2: (B, C, H, W), through the run's mechanisms (mechanisms.py)."""
        with self.autocast():
            _, z1 = self.forward(v1)  # (B, D)
            _, z2 = self.forward(v2)
            if not self.mech.asymmetric:  # both branches the same network: the loss as its method states it, once
                return self.loss_fn(z1.float(), z2.float(), **self.loss_params)
            q = self.model.predictor
            p1, p2 = (q(z1), q(z2)) if q is not None else (z1, z2)  # online outputs, (B, D)
            if self.ema is not None:
                t1, t2 = self.ema(v1), self.ema(v2)  # targets from ξ, (B, D), no graph
            else:
                t1, t2 = (z1.detach(), z2.detach()) if self.mech.stop_grad else (z1, z2)
        return two_way_loss(self.loss_fn, self.loss_params, p1.float(), p2.float(), t1.float(), t2.float())

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict[str, Any]:
        """Every due evaluator (evaluate.EVALUATORS, in order) on one set of embeddings shared by all of them."""
        ep = self.epoch
        self.model.eval()
        due = [ev for ev in self.evaluators if ev.due(ep, final)]
        shared = SharedEmbeddings(self.model, self.autocast, self.augment, self.train_x, self.test_x, self.eval_idx,
                                  self.labels, self.cfg.eval, ep, splits=any(ev.downstream for ev in due))
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        for ev in due:
            if not ev.downstream:
                out.update(ev(shared))
        out["metrics_seconds"] = time.perf_counter() - t0  # collapse metrics incl. their own forward passes
        carried: dict[str, Any] = {}
        for ev in due:
            if ev.downstream:
                (carried if ev.carried else out).update(ev(shared))
        if carried:
            self.last_probe = {**carried, "probe_epoch": ep}
        # Every report carries the latest probe so a scheduler never meets a missing metric; probe_epoch says
        # when it was measured.
        out.update(self.last_probe)
        return out


def load_own(cfg: TrainConfig) -> ImageData:
    """cfg's dataset for one process alone: streamed or loaded whole, as cfg.data.storage says ("auto": streamed
    above the cap, "shared" has nothing to share with here and loads whole)."""
    return load_data(cfg.data, own_storage(cfg.data), workers=cfg.data.workers or torch.get_num_threads())


def train(cfg: TrainConfig, report: Report | None = None, resume: dict | None = None,
          data: ImageData | None = None) -> dict:
    """Train encoder + projector with `cfg.loss.method`; returns the last report.

    report(metrics, state): called after every epoch; metrics hold epoch, loss terms, collapse metrics of z and
    h (suffix _h), knn_acc, probe_acc, epoch_seconds, images_per_s and status ("running", "finished" or
    "diverged"). A non-finite loss (or an unrecoverable W-MSE whitening) ends the run with status "diverged";
    no exception escapes for it. data: cfg's dataset, already held (a node's shared copy); None loads it here.
    """
    run = _Run(cfg, data)
    try:
        return _train(run, cfg, report, resume)
    finally:
        run.close()


def _train(run: _Run, cfg: TrainConfig, report: Report | None, resume: dict | None) -> dict:
    if resume is not None:
        run.restore(resume)
    t = cfg.train
    metrics: dict[str, Any] = {}
    while run.epoch < t.epochs:
        start = time.perf_counter()
        reached = run.epoch + 1  # the epoch being run; a divergence inside it ends the trial there
        try:
            terms = run.train_epoch()
            train_s = time.perf_counter() - start
            run.epoch += 1
            final = run.epoch == t.epochs
            metrics = {"epoch": run.epoch, **terms, **run.evaluate(final)}
        except (FloatingPointError, WhiteningError) as err:
            metrics = {"epoch": reached, "status": "diverged", "error": str(err), "loss": math.nan, "collapse": "diverged",
                       **run.last_probe}
            if report:
                report(metrics, None)
            return metrics
        metrics["epoch_seconds"] = time.perf_counter() - start
        metrics["train_seconds"] = train_s
        metrics["images_per_s"] = run.steps_per_epoch * run.batch / train_s
        metrics["lr"] = run.opt.param_groups[0]["lr"]
        metrics["status"] = "finished" if final else "running"
        state = run.state() if (final or run.epoch % t.checkpoint_every == 0) else None
        if report:
            report(metrics, state)
    return metrics


REFERENCE_INITS = 3  # random initialisations averaged: one draw of fewshot_acc on digits moved by 0.066 with the seed


def reference_scores(cfg: TrainConfig, inits: int = REFERENCE_INITS, data: ImageData | None = None
                     ) -> dict[str, dict[str, float]]:
    """Downstream scores of the randomly initialised encoder and of raw pixels: the floor any SSL run must beat.

    Same data split, backbone and probes as `train(cfg)`, so one call per sweep serves every trial of its base
    configuration. The random-init encoder is drawn `inits` times (seeds train.seed + i·1000, as repeats): returns
    {"random_init": mean over the draws, "random_init_sd": their SD (ddof 1), "random_init_<i>": draw i,
    "pixels": {...}}, each {knn_acc, probe_acc, fewshot_acc, ...}. Raw pixels are left out of a streamed dataset
    (an (N, C·H·W) float matrix is what streaming avoids). data: as for `train`.
    """
    data = data if data is not None else load_own(cfg)
    draws = [_reference_once(cfg.with_overrides({"train.seed": cfg.train.seed + i * 1000}), data, pixels=i == 0)
             for i in range(inits)]
    encoders = [d["random_init"] for d in draws]
    mean = {k: sum(e[k] for e in encoders) / inits for k in encoders[0]}
    sd = {k: (sum((e[k] - mean[k]) ** 2 for e in encoders) / (inits - 1)) ** 0.5 if inits > 1 else 0.0
          for k in mean}
    pixels = {"pixels": draws[0]["pixels"]} if "pixels" in draws[0] else {}
    return {"random_init": mean, "random_init_sd": sd, **{f"random_init_{i}": e for i, e in enumerate(encoders)},
            **pixels}


def _reference_once(cfg: TrainConfig, data: ImageData, pixels: bool) -> dict[str, dict[str, float]]:
    run = _Run(cfg, data)
    run.model.eval()
    # what a final epoch's downstream evaluators measure, on frozen features
    final = [ev for ev in run.evaluators if ev.downstream and ev.due(cfg.train.epochs, final=True)]

    def scores(train_f: torch.Tensor, test_f: torch.Tensor) -> dict[str, float]:
        return {k: v for ev in final for k, v in ev.score(train_f, test_f, run.labels).items()}

    h_train = embed(run.model, run.train_x, 1024, run.autocast).h
    h_test = embed(run.model, run.test_x, 1024, run.autocast).h
    out = {"random_init": scores(h_train, h_test)}
    if pixels and isinstance(run.train_x, torch.Tensor):
        out["pixels"] = scores(as_float(run.train_x).flatten(1), as_float(run.test_x).flatten(1))
    run.close()
    return out
