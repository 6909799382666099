"""cxr-fl coordinating server: Flower ServerApp, strategies and the cxr-fl-server CLI."""

import common  # noqa: F401  (limits OpenMP's spinning before torch loads: common/openmp.py)
