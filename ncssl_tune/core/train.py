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

from ncssl_tune.config import TrainConfig
from ncssl_tune.core.augment import TwoViewAugment, default_augment
from ncssl_tune.core.data import load_dataset
from ncssl_tune.core.losses import LOSSES, WhiteningError
from ncssl_tune.core.metrics import (
    CollapseThresholds,
    LinearHead,
    all_finite,
    collapse_metrics,
    entropy_cond,
    lidar,
    low_rank_route,
)
from ncssl_tune.core.models import SSLModel, build_backbone, build_projector
from ncssl_tune.core.optim import build_optimizer, lr_at
from ncssl_tune.core.probe import fewshot_probe, knn_acc, linear_probe

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


def last_linear(model: SSLModel) -> torch.nn.Linear | None:
    """The projector's last layer when it is an nn.Linear (build_projector's always is), else None."""
    proj = model.projector
    if isinstance(proj, torch.nn.Sequential) and len(proj) > 0 and isinstance(proj[-1], torch.nn.Linear):
        return proj[-1]
    return None


@torch.no_grad()
def embed(model: SSLModel, x: torch.Tensor, batch: int, autocast, head_input: bool = False) -> tuple[torch.Tensor, ...]:
    """h: (N, F), z: (N, D) in eval mode, float32; with head_input also a: (N, P), the input of the projector's
    last nn.Linear (z = a Wᵀ + b, for metrics.LinearHead; head_input needs last_linear(model))."""
    last = last_linear(model) if head_input else None
    if head_input and last is None:
        raise ValueError("embed: head_input needs a projector that ends with an nn.Linear")
    hs, zs, as_ = [], [], []
    for i in range(0, x.shape[0], batch):
        with autocast():
            if last is None:
                h, z = model(x[i:i + batch])
            else:  # SSLModel.forward split before the last layer, in one pass
                h = model.backbone(x[i:i + batch])
                a = model.projector[:-1](h)
                z = last(a)
                as_.append(a.float())
        hs.append(h.float())
        zs.append(z.float())
    return (torch.cat(hs), torch.cat(zs), *((torch.cat(as_),) if head_input else ()))


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

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)
        d = cfg.data
        self.data = load_dataset(d.dataset, root=d.root, seed=d.seed, test_fraction=d.test_fraction,
                                 image_size=d.image_size, synthetic=d.synthetic or None)
        dev = self.device
        self.train_x, self.train_y = self.data.train_x.to(dev), self.data.train_y.to(dev)
        self.test_x, self.test_y = self.data.test_x.to(dev), self.data.test_y.to(dev)
        c, s = self.train_x.shape[1], self.train_x.shape[-1]
        self.augment = TwoViewAugment(default_augment(s, c, d.augment), s, c).to(dev)
        backbone, feat = build_backbone(cfg.model.backbone, c, s, backbone_options(cfg))
        projector, _ = build_projector(feat, cfg.model.projector, cfg.model.norm)
        self.model = SSLModel(backbone, projector).to(dev)
        if dev.type == "cuda" and cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.model.compile and dev.type == "cuda" else self.model
        self.opt = build_optimizer(t.optimizer, self.model, t.lr, t.weight_decay)
        n = self.train_x.shape[0]
        self.batch = min(t.batch_size, n)
        self.steps_per_epoch = n // self.batch
        self.total_steps = self.steps_per_epoch * t.epochs
        self.warmup_steps = round(t.warmup_epochs * self.steps_per_epoch)
        g = torch.Generator().manual_seed(d.seed)
        m = min(cfg.eval.eval_samples, n)
        self.eval_idx = torch.randperm(n, generator=g)[:m].to(dev)  # fixed subset, same for every trial
        self.loss_fn = LOSSES[cfg.loss.method]
        self.loss_params = cfg.loss.params()
        e = cfg.eval
        self.thresholds = CollapseThresholds(total_std=e.collapse_total_std, dim_rank_frac=e.collapse_dim_frac)
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
        self.__dict__.clear()
        if cuda:
            torch.cuda.empty_cache()

    def state(self) -> dict:
        """A snapshot, detached from the live tensors (state_dict() alone returns views that keep training)."""
        s = {"model": _to_cpu(self.model.state_dict()), "optimizer": _to_cpu(self.opt.state_dict()),
             "epoch": self.epoch, "cpu_rng": torch.get_rng_state(), "last_probe": dict(self.last_probe)}
        if self.device.type == "cuda":
            s["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return s

    def restore(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.epoch = int(s["epoch"])
        torch.set_rng_state(s["cpu_rng"])
        if "cuda_rng" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)
        self.last_probe = dict(s.get("last_probe", {}))

    def train_epoch(self) -> dict[str, float]:
        """One pass; returns the mean of every loss term. Raises FloatingPointError on a non-finite loss."""
        t = self.cfg.train
        self.model.train()
        # Batch order from its own generator keyed by (seed, epoch): a resumed run sees the same batches.
        g = torch.Generator().manual_seed(t.seed * 100003 + self.epoch)
        perm = torch.randperm(self.train_x.shape[0], generator=g).to(self.device)
        sums: dict[str, float] = {}
        for b in range(self.steps_per_epoch):
            step = self.epoch * self.steps_per_epoch + b
            lr = lr_at(step, self.total_steps, self.warmup_steps, t.lr, t.final_lr_frac)
            for group in self.opt.param_groups:
                group["lr"] = lr
            x = self.train_x[perm[b * self.batch:(b + 1) * self.batch]]  # (B, C, H, W)
            v1, v2 = self.augment(x)
            if self.device.type == "cuda" and self.cfg.model.channels_last:
                v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                _, z1 = self.forward(v1)
                _, z2 = self.forward(v2)
            terms = self.loss_fn(z1.float(), z2.float(), **self.loss_params)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {self.epoch + 1}, step {b}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        return {k: v / self.steps_per_epoch for k, v in sums.items()}

    def downstream(self, train_f: torch.Tensor, test_f: torch.Tensor, knn: bool = True,
                   probes: bool = True) -> dict[str, float]:
        """knn_acc and fewshot_acc (knn=True), probe_acc (probes=True) of frozen train_f (N, F), test_f (M, F)."""
        e, out = self.cfg.eval, {}
        kw = {"num_classes": self.data.num_classes, "seed": self.cfg.data.seed}
        if knn:  # the few-labels probe (~0.1 s on digits) is as cheap as kNN, so it shares kNN's schedule
            out["knn_acc"] = knn_acc(train_f, self.train_y, test_f, self.test_y, k=e.knn_k, t=e.knn_t,
                                     num_classes=self.data.num_classes)
            if e.fewshot_k:
                out.update(fewshot_probe(train_f, self.train_y, test_f, self.test_y, k=e.fewshot_k,
                                         draws=e.fewshot_draws, weight_decay=e.fewshot_weight_decay, **kw))
        if probes:
            out.update(linear_probe(train_f, self.train_y, test_f, self.test_y, weight_decays=e.probe_weight_decays,
                                    val_fraction=e.probe_val_fraction, **kw))
        return out

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict[str, Any]:
        """Collapse metrics on the fixed eval subset; kNN and probe on their schedule (always at the end)."""
        e, ep = self.cfg.eval, self.epoch
        self.model.eval()
        out: dict[str, Any] = {}
        do_knn = final or bool(e.knn_every and ep % e.knn_every == 0)
        do_probe = final or ep == 1 or bool(e.probe_every and ep % e.probe_every == 0)
        # z = a Wᵀ through a narrow last layer (P < min(M, D)): the metrics decompose (P+1)² instead of min(M, D)²
        last = last_linear(self.model)
        low_rank = last is not None and low_rank_route(last.in_features, len(self.eval_idx), last.out_features)
        a = None
        if do_knn or do_probe:
            # One pass over train serves kNN, the probe and (its rows at eval_idx) the collapse metrics.
            htr, ztr, *atr = embed(self.model, self.train_x, 1024, self.autocast, head_input=low_rank)
            hte, _ = embed(self.model, self.test_x, 1024, self.autocast)
            h, z = htr[self.eval_idx], ztr[self.eval_idx]
            a = atr[0][self.eval_idx] if atr else None
        t0 = time.perf_counter()
        x_eval = self.train_x[self.eval_idx]  # (M, C, H, W)
        if not (do_knn or do_probe):
            h, z, *a_ = embed(self.model, x_eval, 1024, self.autocast, head_input=low_rank)
            a = a_[0] if a_ else None
        if not all_finite(h, z):
            raise FloatingPointError(f"non-finite embeddings after epoch {ep}")
        head = LinearHead(a, last.weight, last.bias) if a is not None else None
        for rep, suffix, rep_head in ((z, "", head), (h, "_h", None)):
            m = collapse_metrics(rep, self.thresholds, suffix=suffix, head=rep_head)
            # every epoch's: the driver keeps them all for the trial's spectrum-over-epochs record
            out[f"spectrum{suffix}"] = [float(v) for v in m.pop(f"spectrum{suffix}")]
            out.update(m)
        if e.cond_views:
            x_cond = x_eval[:e.cond_samples]  # (Mc, C, H, W)
            views = self.augment.views(x_cond, e.cond_views)  # (K, Mc, C, H, W)
            k, mm = views.shape[:2]
            hk, zk = embed(self.model, views.flatten(0, 1), 1024, self.autocast)
            hk, zk = hk.view(k, mm, -1), zk.view(k, mm, -1)  # (K, Mc, F), (K, Mc, D)
            out["entropy_cond"] = float(entropy_cond(zk))
            out["lidar"], out["lidar_h"] = lidar(zk), lidar(hk)  # the same views: no extra forward pass
        out["metrics_seconds"] = time.perf_counter() - t0  # collapse metrics incl. their own forward passes
        if do_knn:
            out.update(self.downstream(htr, hte, probes=False))
        if do_probe:
            self.last_probe = {**self.downstream(htr, hte, knn=False), "probe_epoch": ep}
        # Every report carries the latest probe so a scheduler never meets a missing metric; probe_epoch says
        # when it was measured.
        out.update(self.last_probe)
        return out


def train(cfg: TrainConfig, report: Report | None = None, resume: dict | None = None) -> dict:
    """Train encoder + projector with `cfg.loss.method`; returns the last report.

    report(metrics, state): called after every epoch; metrics hold epoch, loss terms, collapse metrics of z and
    h (suffix _h), knn_acc, probe_acc, epoch_seconds, images_per_s and status ("running", "finished" or
    "diverged"). A non-finite loss (or an unrecoverable W-MSE whitening) ends the run with status "diverged";
    no exception escapes for it.
    """
    run = _Run(cfg)
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


def reference_scores(cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """Downstream scores of the randomly initialised encoder and of raw pixels: the floor any SSL run must beat.

    Same data split, backbone and probes as `train(cfg)`, so one call per sweep serves every trial of its base
    configuration. Returns {"random_init": {knn_acc, probe_acc, fewshot_acc, ...}, "pixels": {...}}.
    """
    run = _Run(cfg)
    run.model.eval()
    htr, _ = embed(run.model, run.train_x, 1024, run.autocast)
    hte, _ = embed(run.model, run.test_x, 1024, run.autocast)
    return {"random_init": run.downstream(htr, hte),
            "pixels": run.downstream(run.train_x.flatten(1), run.test_x.flatten(1))}
