"""`settle_heap`: what a started service keeps is frozen, the young generation is collected rarely,
and garbage in cycles is still collected (memory stays bounded)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent(
    """
    import gc, weakref
    from papertrade.stack.procs import GC_THRESHOLDS, settle_heap

    kept = [[i] for i in range(1000)]  # what start-up built
    settle_heap()
    assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()
    assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()

    class Node:
        pass

    first = Node()
    first.me = first  # a cycle: reference counting never frees it
    probe = weakref.ref(first)
    del first
    collections = gc.get_stats()[0]["collections"]
    for _ in range(GC_THRESHOLDS[0] // 2):  # churn: allocated and freed at once, no collection
        [[]]
    assert gc.get_stats()[0]["collections"] == collections
    assert probe() is not None
    cycles = []
    for _ in range(GC_THRESHOLDS[0]):  # net growth past the threshold: a collection runs
        node = Node()
        node.me = node
        cycles.append(node)
    del cycles, node
    for _ in range(GC_THRESHOLDS[0] + 1):
        node = Node()
        node.me = node
    assert gc.get_stats()[0]["collections"] > collections
    assert probe() is None
    print("ok")
    """
)


def test_settle_heap_freezes_start_up_and_still_collects_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
