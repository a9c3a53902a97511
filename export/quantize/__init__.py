"""Quantized denoisers (FP8, INT8, NVFP4) through NVIDIA Model Optimizer: recipe, calibration, export, checks.

Only the export imports this package; Model Optimizer itself is imported inside the functions that
need it, so ``python -m export`` without ``--quantize`` never loads it.
"""
