"""One small registry used by every pluggable family (routers, encoders, fusions, ...).

Modelled on timm's ``create_model``: components register under a name, are built by
name with keyword arguments, and an unknown name fails with the list of known names.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


_FAMILIES: dict[str, Registry] = {}


def family(name: str) -> Registry | None:
    """The registry of a family ("router", ...) once the module that creates it is imported.

    Lets ``modalmoe.config`` check a component's name when a config is validated without
    importing the room that defines the component (configs sit on the lowest floor)."""
    return _FAMILIES.get(name)


class UnknownName(KeyError):
    """No component is registered under that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class UnknownOption(TypeError):
    """A component was given an option it does not take; the message lists the ones it does."""


class Registry(Generic[T]):
    """A named family of constructors.

    Example:
        >>> routers = Registry("router")
        >>> @routers.register("token_choice")
        ... class TokenChoiceRouter: ...
        >>> routers.create("token_choice")
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Callable[..., T]] = {}
        _FAMILIES[family] = self

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a class or factory under ``name``."""

        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered under ``name``; raises ``UnknownName`` (a ``KeyError``)
        listing the known names. Configs name components freely; the name is checked here,
        when the component is built, so that ``config`` needs no registry below it."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownName(
                f"unknown {self.family} {name!r}.{hint} Known {self.family}s: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered under ``name`` with keyword arguments.

        Raises:
            UnknownOption: for a keyword the constructor does not take (a typo in a config's
                options), naming it, the closest valid ones and every option it takes.
        """
        fn = self.get(name)
        options = self.options(name)
        if options is not None:
            unknown = [key for key in kwargs if key not in options]
            if unknown:
                close = difflib.get_close_matches(unknown[0], options, n=3)
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                raise UnknownOption(
                    f"{self.family} {name!r} has no option {', '.join(map(repr, unknown))}{hint}; "
                    f"its options: {', '.join(options) or '(none)'}"
                )
        return fn(**kwargs)

    def options(self, name: str) -> list[str] | None:
        """The keyword options of ``name``'s constructor (None when it takes ``**kwargs``)."""
        try:
            parameters = inspect.signature(self.get(name)).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: let the call decide
            return None
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            return None
        return [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, names={self.names()})"
