"""The engine: a run's tensors, its network of ops, the forward and the manual backward, training."""
