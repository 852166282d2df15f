"""Stand-ins, in Ray's saved run configuration, for the callbacks and stoppers of the process running a sweep now.

Ray pickles the run configuration (callbacks, stoppers) with the experiment, and `Tuner.restore` brings back those
pickled objects: a resumed sweep would print to the first process's settings, carry its counters, and have no
way to take this process's callbacks (an extra one for a test, a new budget stopper). So the Tuner is given
`LiveCallbacks(key, callbacks)` and `LiveStopper(key, stoppers)`: in whichever process runs the sweep they forward
every hook to what that process registered under the key with `register` (public Ray API only). Where nothing is
registered (Ray Client runs the Tuner in a remote actor) they fall back to the objects they were built with,
which is what Ray itself would have used.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

_CALLBACKS: dict[str, list[Callback]] = {}
_STOPPERS: dict[str, list[Stopper]] = {}

HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
         "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_checkpoint",
         "on_experiment_end")


def register(key: str, callbacks: list[Callback], stoppers: list[Stopper]) -> None:
    """This process's callbacks and stoppers for the sweep `key` (its Tune path), in a stable order: the
    callbacks' saved state is matched by position and class."""
    _CALLBACKS[key] = list(callbacks)
    _STOPPERS[key] = list(stoppers)


def unregister(key: str) -> None:
    _CALLBACKS.pop(key, None)
    _STOPPERS.pop(key, None)


def _state_key(i: int, obj: Any) -> str:
    return f"{i}:{type(obj).__name__}"


class LiveCallbacks(Callback):
    """Forwards every Ray Tune hook, in order, to the callbacks registered under `key` in this process."""

    def __init__(self, key: str, callbacks: list[Callback]):
        self.key = key
        self.own = list(callbacks)

    @property
    def callbacks(self) -> list[Callback]:
        return _CALLBACKS.get(self.key, self.own)

    def get_state(self) -> dict | None:
        state = {_state_key(i, cb): cb.get_state() for i, cb in enumerate(self.callbacks)}
        return {k: v for k, v in state.items() if v} or None

    def set_state(self, state: dict) -> None:
        for i, cb in enumerate(self.callbacks):
            if state.get(_state_key(i, cb)):
                cb.set_state(state[_state_key(i, cb)])


def _forward(name: str):
    def hook(self: LiveCallbacks, *args, **kwargs) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args, **kwargs)
    hook.__name__ = name
    return hook


for _name in HOOKS:
    setattr(LiveCallbacks, _name, _forward(_name))


class LiveStopper(Stopper):
    """Stops a trial (or the sweep) when any stopper registered under `key` says so. Unlike Ray's CombinedStopper,
    whose any() stops asking at the first yes, every stopper sees every result."""

    def __init__(self, key: str, stoppers: list[Stopper]):
        self.key = key
        self.own = list(stoppers)

    @property
    def stoppers(self) -> list[Stopper]:
        return _STOPPERS.get(self.key, self.own)

    def __call__(self, trial_id: str, result: dict) -> bool:
        answers = [s(trial_id, result) for s in self.stoppers]  # all of them, before any() looks
        return any(answers)

    def stop_all(self) -> bool:
        answers = [s.stop_all() for s in self.stoppers]
        return any(answers)
