"""What a dataset on disk that cannot be used raises: one error naming the dataset, its root, the problem and the fix.
Its own module so that the loaders of every format (data.py, imagefolder.py) raise the same errors."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset on disk could not be found or read; the message says what was expected and how to get it."""


class DatasetMissing(DatasetError):
    """The dataset's files are not on this machine (no root, no folder, files absent): they may be on another one
    (a cluster's nodes), so `validate` and --dry-run note it, while starting a sweep here is an error. `short`: the
    problem alone, for `validate`'s one line per file (the message adds where the files go and how to get them)."""

    def __init__(self, message: str, short: str = ""):
        super().__init__(message)
        self.short = short or message


def content_error(name: str, root: str | None, problem: str, fix: str) -> DatasetError:
    """Files present but unusable: names the dataset, its root, the problem and what to fix (on this machine)."""
    where = f"{name} (root {root})" if root else name
    return DatasetError(f"{where}: {problem}; {fix}".replace("\n", " "))
