"""OpenMP worker threads that stop spinning soon when they wait, chosen before torch loads.

torch's CPU kernels (ATen, MKL, oneDNN) run on GNU OpenMP (``libgomp``, bundled in the torch
wheel). By default a libgomp thread that waits (at the end of every parallel region: each
convolution, each optimizer step) spins on its core for 300,000 iterations before it sleeps. That
is harmless on cores nobody else wants, and ruinous on shared ones: cxr-fl puts several busy
processes on one machine (a site's training beside its SuperNode; co-located sites; the
coordinator's SuperLink, gateway and ServerApp; Ray's workers; a study beside anything), and a
spinning thread then holds a core that the thread it waits for needs.

cxr-fl sets ``GOMP_SPINCOUNT=1000``: a waiting thread spins briefly, then sleeps. Measured on
2 cores (``benchmarks/openmp_wait.py``, ResNet18 at 64 px, batch 32, 2 threads, seconds per step,
libgomp's default / this / ``OMP_WAIT_POLICY=PASSIVE``): alone 0.320 / 0.333 / 0.338; beside one
busy process 1.870 / 0.521 / 0.493; two such trainings at once 1.021 / 0.435 / 0.447.

libgomp reads its environment once, when it is loaded (at ``import torch``), so each cxr-fl
package sets it in its ``__init__``, before any of its modules imports torch; the processes it
starts inherit it. A wait policy already in the environment (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT``) is left as it is.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT = "1000"


def limit_openmp_spinning() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the environment already chose a wait policy.

    Returns whether the setting in the environment reaches this process's OpenMP, i.e. torch was
    not loaded yet (processes started from here get it either way).
    """
    if WAIT_POLICY_ENV not in os.environ:
        os.environ.setdefault(SPIN_COUNT_ENV, SPIN_COUNT)
    return "torch" not in sys.modules
