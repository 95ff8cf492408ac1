"""Binding plain values to executor functions for Spark's pandas/Arrow UDF APIs.

Spark's ``applyInPandas``/``mapInPandas``/``cogroup`` inspect the function they get: its arity
(one argument, or two for a cogroup) and its type hints (they warn on ``functools.partial``).
These helpers return plain closures of the right arity over plain values, which pickle small.
"""

from __future__ import annotations

from typing import Any, Callable


def _named(bound: Callable, function: Callable) -> Callable:
    bound.__name__ = function.__name__
    bound.__qualname__ = function.__qualname__
    bound.__doc__ = function.__doc__
    return bound


def bind(function: Callable, **values: Any) -> Callable:
    """``data -> function(data, **values)``."""

    def bound(data):
        return function(data, **values)

    return _named(bound, function)


def bind_pair(function: Callable, **values: Any) -> Callable:
    """``(left, right) -> function(left, right, **values)``, for cogroups."""

    def bound(left, right):
        return function(left, right, **values)

    return _named(bound, function)
