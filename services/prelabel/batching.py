"""Consecutive batches bounded by a count and a weight (bytes, pixels): one rule for every caller."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def bounded(items: Iterable[T], weight: Callable[[T], int], budget: int, count: int = 0) -> Iterator[list[T]]:
    """Batches in order of at most ``count`` items (0: any number) whose weights add up to at most
    ``budget``; an item heavier than the budget goes alone rather than being refused."""
    batch: list[T] = []
    held = 0
    for item in items:
        w = weight(item)
        if batch and ((count and len(batch) == count) or held + w > budget):
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += w
    if batch:
        yield batch
