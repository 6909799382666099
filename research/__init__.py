"""Research code beside the product: not installed, not in the app bundle (see research/study)."""
