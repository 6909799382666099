"""cxr-fl: the ML core shared by server, client and simulation. No Flower imports here."""

from common.openmp import limit_openmp_spinning

limit_openmp_spinning()  # before any module imports torch (common/openmp.py says why)
