"""Quantized client-to-server updates: TFF's uniform quantization encoder applied to every tensor.

`tff.aggregators.EncodedSumFactory.quantize_above_threshold` (threshold 0, so even a 7-weight
logistic regression is quantized; the default threshold of 20,000 elements would leave small
models untouched): each client flattens each tensor, maps it onto 2**bits levels between the
tensor's own min and max, and bit-packs the levels into int32 words; the server decodes and sums.
Rounding is deterministic (nearest level): the stochastic variant draws an unseeded random op,
which TensorFlow refuses under op determinism. The error of one value is at most half a step,
step = (max - min) / (2**bits - 1).

Encoded size per tensor of n elements: ceil(n * bits / 32) int32 words + two float32 (min, max).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def quantized_sum_factory(tff: Any, bits: int) -> Any:
    return tff.aggregators.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=bits, threshold=0, stochastic=False
    )


def quantized_mean_factory(tff: Any, bits: int) -> Any:
    """A weighted mean whose weighted client values travel quantized."""
    return tff.aggregators.MeanFactory(value_sum_factory=quantized_sum_factory(tff, bits))


def encoded_tensor_bytes(n_elements: int, bits: int) -> int:
    return 4 * math.ceil(n_elements * bits / 32) + 2 * 4


def encoded_bytes(shapes: Iterable[tuple[int, ...]], bits: int) -> int:
    """Bytes of the quantized encoding of tensors of the given shapes."""
    return sum(encoded_tensor_bytes(int(np.prod(shape, dtype=np.int64)), bits) for shape in shapes)


def step_size(values: np.ndarray, bits: int) -> float:
    """The quantization step of one tensor: its range over the number of intervals."""
    return float((np.max(values) - np.min(values)) / (2**bits - 1))
