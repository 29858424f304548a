"""What the built-in ``selftest`` stage must compute, derived independently of the stage code
(import it: ``from selftest_reference import reference_checksum``)."""
from __future__ import annotations


def reference_checksum(steps: int, seed: int) -> int:
    """The selftest counter's value after ``steps`` steps from ``seed``."""
    acc = seed
    for i in range(1, steps + 1):
        acc = (acc * 31 + i * i) % 1_000_003
    return acc
