"""Running a batch so that one bad item fails alone: retry the failed batch in halves (plain Python, testable)."""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Union

log = logging.getLogger("trident")


def run_in_halves(items: List[Any], run: Callable[[List[Any]], List[Any]]) -> List[Union[Any, Exception]]:
    """`run(items)`, one output per item; if it raises, each half is run the same way, down to single items.

    Returns each item's output, or the exception its item failed with when run alone. One item that breaks
    the batch (a bad image in post-processing, an out-of-memory batch) costs about 2·log2(n) extra, smaller
    runs, and the other items are still served; results must not depend on the batch's composition.
    """
    if not items:
        return []
    try:
        outputs = list(run(items))
        if len(outputs) != len(items):
            raise RuntimeError(f"a batch of {len(items)} items gave {len(outputs)} outputs")
        return outputs
    except Exception as exc:  # noqa: BLE001 - retried smaller, then the item's own error
        if len(items) == 1:
            return [exc]
        log.warning("a batch of %d failed (%s: %s): retrying in halves", len(items), type(exc).__name__, exc)
    half = len(items) // 2  # outside the except block: the failed attempt's memory is freed first
    return run_in_halves(items[:half], run) + run_in_halves(items[half:], run)
