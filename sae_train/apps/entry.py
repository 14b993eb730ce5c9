"""The console scripts (``sae-cache``, ``sae-train``, ``foxp2-*``): process settings that must
precede torch's import, then the Hydra app. The ``foxp2-*`` ones live here too because
importing the ``steering`` package loads torch (its top level exports ``steer``); they import
their app only after :func:`prepare_process`.

**Transparent huge pages for torch's CPU allocator** (``THP_MEM_ALLOC_ENABLE=1``, read by
torch once, at its first allocation). The steering harness allocates and frees full-vocabulary
tensors all the time (262k columns on Gemma: one batch of log-probs is hundreds of MB); glibc
serves each from fresh ``mmap`` pages, and the first touch of every 4 KiB page is a page fault.
On the demo's steer stage that was 71 M faults and 129 s of system time out of 578 CPU-seconds;
with huge pages 1.7 M faults, 46 s, and the stage 22% faster with identical results
(docs/results.md, "Issue 17: the allocator"). Linux only; a value the user set is kept
(``THP_MEM_ALLOC_ENABLE=0`` turns it off). The apps' stages are unchanged when called from
Python (the setting cannot reach a process that has already imported torch).
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import Callable


def prepare_process() -> None:
    """Ask for huge pages unless the user chose (a no-op outside Linux). Inherited by the
    subprocesses the demo starts."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _entry(module: str, name: str) -> Callable[[], None]:
    """The console script ``name``: :func:`prepare_process`, then ``module``'s Hydra ``main``."""

    def run() -> None:
        prepare_process()
        import_module(module).main()

    run.__name__ = run.__qualname__ = name.replace("-", "_")
    run.__doc__ = f"``{name}``: the Hydra app of :mod:`{module}`."
    return run


sae_cache = _entry("sae_train.apps.cache_app", "sae-cache")
sae_train = _entry("sae_train.apps.train_app", "sae-train")
foxp2_localise = _entry("steering.apps.localise_app", "foxp2-localise")
foxp2_steer = _entry("steering.apps.steer_app", "foxp2-steer")
foxp2_generate = _entry("steering.apps.generate_app", "foxp2-generate")
foxp2_demo = _entry("steering.apps.demo_app", "foxp2-demo")
