"""cxr-fl coordinating server: Flower ServerApp, strategies and the cxr-fl-server CLI."""
