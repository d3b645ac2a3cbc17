"""Seconds per named phase of a job, summed over calls: what a job returns and its benchmark prints, with no patching.

    from lib.timing import Phases
    phases = Phases()
    with phases("seconds_scores"):
        ...
    summary = {**summary, **phases}     # {"seconds_scores": 1.23, ...}
"""
from __future__ import annotations

import contextlib
import time


class Phases(dict):
    """A dict of seconds per phase name; `with phases(name):` adds the block's wall time to phases[name]."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0
