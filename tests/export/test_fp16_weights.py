"""The fp16 weights the export writes (and hashes for the weight map) are onnxruntime's converter's, bit for bit."""

from __future__ import annotations

import numpy as np
from onnxruntime.transformers.float16 import convert_np_to_float16

from export.weights import fp32_bytes_to_fp16, saturating_fp16

EDGES = [0.0, -0.0, 1e-9, -1e-9, 5.9e-8, -5.9e-8, 5.97e-8, 3e-8, 1e-5, 65504.0, 65519.0, 70000.0, 1e30, -1e30]


def test_the_fast_conversion_equals_the_converters_own_bit_for_bit():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            np.array([*EDGES, np.inf, -np.inf], dtype=np.float32),
            rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 100_000),
        ]
    ).astype(np.float32)
    expected = convert_np_to_float16(values)
    assert np.array_equal(saturating_fp16(values).view(np.uint16), expected.view(np.uint16))
    assert fp32_bytes_to_fp16(values.tobytes()) == expected.tobytes()
    matrix = values[: 300 * 300].reshape(300, 300)
    assert np.array_equal(saturating_fp16(matrix.T).view(np.uint16), convert_np_to_float16(matrix.T).view(np.uint16))


def test_nan_stays_nan():
    assert np.isnan(saturating_fp16(np.array([np.nan], dtype=np.float32))).all()
