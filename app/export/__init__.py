"""Take a run home: a script or a notebook that reproduces it."""
