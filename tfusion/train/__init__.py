"""Training: parameters on a mesh, the jitted step, the loop, checkpoints, metrics."""
