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


def prepare_process() -> None:
    """Ask for huge pages unless the user chose (a no-op outside Linux). Inherited by the
    subprocesses the demo starts."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def sae_cache() -> None:
    prepare_process()
    from sae_train.apps.cache_app import main
    main()


def sae_train() -> None:
    prepare_process()
    from sae_train.apps.train_app import main
    main()


def foxp2_localise() -> None:
    prepare_process()
    from steering.apps.localise_app import main
    main()


def foxp2_steer() -> None:
    prepare_process()
    from steering.apps.steer_app import main
    main()


def foxp2_generate() -> None:
    prepare_process()
    from steering.apps.generate_app import main
    main()


def foxp2_demo() -> None:
    prepare_process()
    from steering.apps.demo_app import main
    main()
