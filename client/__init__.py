"""cxr-fl hospital site: Flower ClientApp and the cxr-fl-client CLI."""
