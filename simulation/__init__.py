"""python -m simulation: non-IID partitions of public CXR sets and whole simulated federations."""
