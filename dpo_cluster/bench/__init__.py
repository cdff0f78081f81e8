"""Benchmarks that run dpo-cluster and its peer on the same machine, in one run, and print ratios."""
