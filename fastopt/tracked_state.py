"""``optimizer.state`` that counts its changes, so that cached launch plans notice them.

The fused step caches each param group's state tensors between steps (a plan); torch.optim
reads ``optimizer.state`` afresh at every step, so code that replaces a param's state, or
an entry of it, expects the next step to use the new one. Every change made through these
mappings (an entry set, removed or cleared, in ``optimizer.state`` or in a param's own
dict) advances one shared count, which the plans compare with theirs. In-place changes of a
tensor's values need nothing: the plans hold the same tensors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


class _Counter:
    """The change count shared by ``optimizer.state`` and each param's state dict."""

    __slots__ = ("version",)

    def __init__(self) -> None:
        self.version = 0


class _CountsRemovals:
    """Removals counted as changes (the mappings below differ in how they set entries)."""

    __slots__ = ()
    _counter: _Counter

    def __delitem__(self, key: Any) -> None:
        self._counter.version += 1
        super().__delitem__(key)  # type: ignore[misc]

    def clear(self) -> None:
        self._counter.version += 1
        super().clear()  # type: ignore[misc]

    def pop(self, *args: Any) -> Any:
        self._counter.version += 1
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        self._counter.version += 1
        return super().popitem()  # type: ignore[misc]


class ParamState(_CountsRemovals, dict):
    """One param's state: replacing, adding or removing an entry (``state[p]['exp_avg'] =
    ...``, ``state[p].clear()``) counts as a change of ``optimizer.state``."""

    __slots__ = ("_counter",)

    def __init__(self, counter: _Counter, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counter = counter

    def __setitem__(self, key: Any, value: Any) -> None:
        self._counter.version += 1
        super().__setitem__(key, value)

    def setdefault(self, *args: Any) -> Any:
        self._counter.version += 1
        return super().setdefault(*args)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._counter.version += 1
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> ParamState:
        self._counter.version += 1
        return super().__ior__(other)

    def __reduce__(self) -> Any:
        # pickled (torch.save) and copied as the plain dict torch.optim keeps: loadable with
        # weights_only, and a copy is no longer this optimizer's
        return (dict, (dict(self),))


class TrackedState(_CountsRemovals, defaultdict):
    """``optimizer.state``: counts its changes and those of each param's state dict
    (``ZeroRedundancyOptimizer.load_state_dict`` assigns ``optim.state[param]`` directly)."""

    def __init__(self, default_factory: Any = dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(default_factory, *args, **kwargs)
        self._counter = _Counter()
        for key, value in self.items():
            dict.__setitem__(self, key, self._own(value))

    @property
    def version(self) -> int:
        return self._counter.version

    def _own(self, value: Any) -> Any:
        """A param's state dict, as one whose edits this optimizer sees."""
        if isinstance(value, dict) and not (
            isinstance(value, ParamState) and value._counter is self._counter
        ):
            return ParamState(self._counter, value)
        return value

    def __missing__(self, key: Any) -> Any:
        if self.default_factory is None:
            raise KeyError(key)
        value = self[key] = self.default_factory()
        return self[key] if isinstance(value, dict) else value

    def __setitem__(self, key: Any, value: Any) -> None:
        self._counter.version += 1
        super().__setitem__(key, self._own(value))

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> TrackedState:
        self.update(other)
        return self

    def __reduce__(self) -> Any:
        # pickled and copied as the defaultdict torch.optim keeps
        return (defaultdict, (self.default_factory, dict(self)))
