"""A dataset's content, checked before a sweep starts: loaded once the way a trial loads it, then held to what the
evaluation needs. Whatever is wrong is one DatasetError naming the dataset, its root and what to fix.

One mechanism for every dataset (digits, synthetic, cifar10/100, stl10, imagefolder, a plugin): `load_dataset`
turns any failure to read the files into a DatasetError, and `check_content` asks the loaded tensors, not the
file format, whether the probes can mean anything.
"""

from __future__ import annotations

import torch

from ncssl_tune.config import TrainConfig
from ncssl_tune.core.data import ImageData, content_error, load_data, plan_storage


def load_checked(cfg: TrainConfig) -> ImageData:
    """cfg's dataset, loaded as a trial of cfg loads it and checked by `check_content`; raises DatasetError. A
    dataset that its trials will stream is listed, not decoded: a damaged image in it fails the trial that reads it."""
    storage, _, _ = plan_storage(cfg.data)
    data = load_data(cfg.data, storage)
    check_content(data, cfg, root=cfg.data.root)
    return data


def _class_name(data: ImageData, i: int) -> str:
    return repr(data.classes[i]) if i < len(data.classes) else str(i)


def check_content(data: ImageData, cfg: TrainConfig, root: str | None = None) -> None:
    """Raise DatasetError unless every probe of cfg can score data: at least two classes, labels in range, every
    class in train (where the probes learn it), and eval.fewshot_k training images of each class."""
    c = data.num_classes

    def error(problem: str, fix: str) -> Exception:
        return content_error(data.name, root, problem, fix)

    if c < 2:
        names = f" ({', '.join(map(repr, data.classes))})" if data.classes else ""
        how = "data.synthetic.classes" if data.name == "synthetic" else "one folder per class under every split"
        raise error(f"only {c} class{'es' * (c != 1)}{names}; the probes that score every trial (knn_acc, "
                    "probe_acc, fewshot_acc) mean nothing with fewer than 2",
                    f"give the dataset at least 2 classes ({how})")
    for split, y in (("train", data.train_y), ("test", data.test_y)):
        if len(y) == 0:
            raise error(f"the {split} split holds no images", f"add images to the {split} split")
        if int(y.min()) < 0 or int(y.max()) >= c:
            raise error(f"{split} labels outside 0..{c - 1} (found {int(y.min())}..{int(y.max())})",
                        "replace the label files with intact copies")
    train = torch.bincount(data.train_y, minlength=c)  # (C,)
    test = torch.bincount(data.test_y, minlength=c)
    absent = [i for i in range(c) if train[i] == 0]
    if absent:
        held = " (it has test images)" if test[absent[0]] else ""
        raise error(f"class {_class_name(data, absent[0])} has no training images{held}; the probes cannot learn it",
                    "add training images of every class")
    k = cfg.eval.fewshot_k
    smallest = int(train.argmin())
    if k and int(train[smallest]) < k:
        n = int(train[smallest])
        raise error(f"class {_class_name(data, smallest)} has {n} training image{'s' * (n != 1)}, fewer than the "
                    f"few-labels probe draws per class (eval.fewshot_k={k})",
                    f"add training images to it, or lower k (--set eval.fewshot_k={n})")
