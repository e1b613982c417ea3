import os

# Two cores on the CI machine: keep torch from oversubscribing them when tests run in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "2")
