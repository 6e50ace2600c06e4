"""Named experiments (ml_collections configs) and sweeps."""
