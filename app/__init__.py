"""Broadprop: manual backprop with tensor broadcasting, checked against PyTorch autograd."""

import os

# OpenMP's threads wait passively (sleep) between parallel regions instead of spinning, unless
# the environment says otherwise. Set before torch loads libgomp, which reads it once. Spinning
# threads burn CPU that counts as the run's own (the deadline's clock): beside two CPU hogs a
# batch-20000 run used 4-7 s of CPU and 45 s of wall time spinning, against 0.6 s and 3 s
# passive (issue 28, N13; benchmarks/omp_wait.py measures it on this machine).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
