"""cxr-fl hospital site: Flower ClientApp and the cxr-fl-client CLI."""

import common  # noqa: F401  (limits OpenMP's spinning before torch loads: common/openmp.py)
