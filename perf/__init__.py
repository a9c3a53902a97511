"""Latency of each backend against the PyTorch baseline, on the same requests."""
