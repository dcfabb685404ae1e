"""The sandbox: learner programs run in worker processes, where an overrun costs that work and
not the server.

The estimates (app/programs/plan.py) still refuse a program at its line before anything runs.
What they miss meets a hard limit here: each worker runs under an OS memory limit (RLIMIT_AS:
its own baseline plus the memory budget plus HEADROOM_BYTES) and is killed at the wall-clock
limit; a worker that fails either way is replaced. The serving process only reads bytes and
hands them on: decoding, validation, the dry run, the run, the training steps and the answer's
JSON all happen in a worker.

jobs.py: what a worker does (no process code); worker.py: a worker's loop and its limits;
zygote.py: the forkserver's preload (torch imported and warmed once, on one thread);
pool.py: the workers, as the server sees them. No web framework is imported here."""
