"""Benchmarks: each prints its baseline, the gateway's figure and the ratio, measured in the
same run on the same machine. ``make bench`` runs them all and writes bench/results.md."""
