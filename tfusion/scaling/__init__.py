"""Scaling-law tools: collect sweep results, fit power laws, parity ratios, plots."""
