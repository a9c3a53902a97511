"""Serving jobs: start-up, the worker, ControlNet folders, memory estimates, encoding and delivery of images."""
