"""Data sources, image cache, splits and transforms (no Flower imports)."""
