"""Backer's benchmark harness: the package behind bench/run, bench/many-files,
bench/prune-history and bench/slow-create (see bench/README.md).

Python 3 standard library only."""
