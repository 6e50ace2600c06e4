"""Flax NNX modules of the Transfusion model."""
