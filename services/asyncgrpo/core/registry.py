"""Name -> function registries: the config's vocabulary for estimators and losses comes from here.

A new advantage estimator or policy loss is one function with a ``@REGISTRY.register("name")`` decorator; the
config schema validates ``actor.adv_estimator`` / ``actor.policy_loss`` against :meth:`Registry.names`, so the
allowed values never need a second list kept in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Functions of one kind by name; registering a name twice is an error (no silent override by import order)."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind  # e.g. "advantage estimator": how errors name the thing
        self.config_key = config_key  # e.g. "actor.adv_estimator": the knob that picks one
        self._fns: dict[str, F] = {}
        self._traits: dict[str, dict[str, object]] = {}

    def register(self, name: str, **traits: object) -> Callable[[F], F]:
        """Register under `name`; `traits` say how a caller must use it (e.g. ``per_token=True``: the estimator
        takes step rewards and returns per-token advantages)."""
        def add(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._fns[name].__module__} and {fn.__module__})")
            self._fns[name] = fn
            self._traits[name] = dict(traits)
            return fn

        return add

    def trait(self, name: str, key: str, default: object = None) -> object:
        self.get(name)  # an unknown name is the usual error
        return self._traits[name].get(key, default)

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise ValueError(f"{self.config_key}={name!r} is not a registered {self.kind}; choose one of {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns
