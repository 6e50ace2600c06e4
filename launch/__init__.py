"""Entry points (train, ...) and cluster launch scripts."""
