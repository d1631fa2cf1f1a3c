"""Throughput benchmarks: the input pipeline against the training step it feeds."""
