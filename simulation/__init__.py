"""python -m simulation: non-IID partitions of public CXR sets and whole simulated federations."""

import common  # noqa: F401  (limits OpenMP's spinning before torch loads: common/openmp.py)
