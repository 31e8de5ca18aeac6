"""Measured runs: scripts here, their records in records/, the peers in peers/ (benchmarks/README.md)."""
