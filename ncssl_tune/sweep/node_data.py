"""One copy of a sweep's dataset per Ray node, in the node's object store, read by every trial on the node.

The driver starts a `DataRegistry` actor. A trial asks it for its node's copy: the first ask on a node starts a
`_NodeCopy` actor pinned to that node, which loads the dataset there once and puts its arrays in the object store;
every trial on the node then maps the same memory (Ray hands numpy arrays out zero-copy), so a node's host memory
grows with the number of trials by what a model and its optimizer need, not by the data. On a GPU each trial still
moves the images it trains on to its device (uint8: a quarter of float32).

Ownership keeps the copies no longer than the sweep: the driver owns the registry, the registry owns the node
copies, and Ray ends an actor with its owner. A node copy that fails to load raises in every trial that asks, so
a damaged file on one node fails that node's trials with the loader's message.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ncssl_tune.config import DataConfig, install_plugins

if TYPE_CHECKING:
    from ncssl_tune.core.data import ImageData

# torch and the loaders are imported where they are used: the registry's worker process imports this module to
# run DataRegistry, and needs neither (torch alone is ~2 s of CPU, taken from the trials starting beside it).

_FIELDS = ("train_x", "train_y", "test_x", "test_y")
LOAD_KEYS = ("dataset", "root", "seed", "test_fraction", "image_size", "synthetic")


def to_arrays(data: ImageData) -> dict:
    """An ImageData as numpy arrays and plain values: what Ray's object store shares without copying."""
    return {**{k: getattr(data, k).numpy() for k in _FIELDS}, "num_classes": data.num_classes, "name": data.name,
            "classes": data.classes}


def from_arrays(arrays: dict) -> ImageData:
    """The ImageData over arrays from the object store, as views: no byte is copied. The store's memory is
    read-only; nothing writes to a dataset (batches are gathered into new tensors)."""
    import torch

    from ncssl_tune.core.data import ImageData
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {k: torch.from_numpy(arrays[k]) for k in _FIELDS}
    return ImageData(**tensors, num_classes=arrays["num_classes"], name=arrays["name"], classes=arrays["classes"])


@ray.remote(num_cpus=0)
class _NodeCopy:
    """The dataset of one DataConfig, loaded on this actor's node and held in the node's object store."""

    def __init__(self, data_cfg: DataConfig):
        self.ref, self.error = None, None
        from ncssl_tune.core.data import load_data

        install_plugins()  # a plugin's dataset: this process unpickled a DataConfig alone, not a whole TrainConfig
        try:
            # the store's copy; this process's own goes with the arrays when __init__ returns
            self.ref = ray.put(to_arrays(load_data(data_cfg, "shared")))
        except Exception as e:  # noqa: BLE001 - raised to every trial that asks, as the loader raised it
            self.error = e

    def ref_(self) -> list:
        if self.error is not None:
            raise self.error
        return [self.ref]  # in a list, so that Ray hands back the reference, not the arrays


@ray.remote(num_cpus=0)
class DataRegistry:
    """The node copies of one sweep, started on first ask, one per (node, dataset)."""

    def __init__(self):
        self.copies: dict[tuple[str, str], ray.actor.ActorHandle] = {}

    def copy_on(self, node_id: str, data_cfg: DataConfig) -> ray.actor.ActorHandle:
        # what the loaded arrays depend on (not augment or storage options)
        key = (node_id, repr([getattr(data_cfg, k) for k in LOAD_KEYS]))
        if key not in self.copies:
            self.copies[key] = _NodeCopy.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(data_cfg)
        return self.copies[key]


def start_registry() -> ray.actor.ActorHandle:
    """A registry owned by this process (the driver), for the trials of one sweep."""
    return DataRegistry.remote()


def node_store_bytes() -> float:
    """The object store capacity of the node this process runs on."""
    me = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == me)
    return node["Resources"].get("object_store_memory", 0.0)


def node_storage(data_cfg: DataConfig) -> tuple[str, str]:
    """(how this node holds data_cfg's dataset, why): data.storage, with "auto" decided against this node's store."""
    from ncssl_tune.core.data import CAP_SHARE, choose_storage, data_shape

    shape = data_shape(data_cfg) if data_cfg.storage == "auto" else None
    return choose_storage(data_cfg, shape, CAP_SHARE * node_store_bytes(), shared=True)


def node_data(registry: ray.actor.ActorHandle, data_cfg: DataConfig) -> ImageData:
    """This node's shared copy of data_cfg's dataset (loaded by the first trial on the node that asks). A copy that
    could not load raises the loader's own error (a DatasetError), not Ray's wrapper."""
    node = ray.get_runtime_context().get_node_id()
    copy = ray.get(registry.copy_on.remote(node, data_cfg))
    try:
        [ref] = ray.get(copy.ref_.remote())
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None
    return from_arrays(ray.get(ref))


def trial_data(registry: ray.actor.ActorHandle | None, data_cfg: DataConfig) -> tuple[str, ImageData | None]:
    """(how a trial on this node holds its data, the data when it is this node's shared copy, else None: the trial
    loads or streams its own). Without a registry (a Tuner built outside run_sweep) there is no copy to share."""
    from ncssl_tune.core.data import own_storage

    if registry is None:  # decided without asking Ray: outside a Ray worker, asking would start a Ray instance
        return own_storage(data_cfg), None
    storage, _ = node_storage(data_cfg)
    return storage, node_data(registry, data_cfg) if storage == "shared" else None
