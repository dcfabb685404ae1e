"""A run end to end, its strategies compared, and training: the orchestration above the
engine, the check, the views and the costs (each of which knows nothing of the others)."""
