"""Keras models (`logreg`, `mlp`) and the TFF `model_fn` that wraps them.

Initial weights are drawn from seeded initializers, so every method of one training seed starts
from the same point; the TFF process state is set to these weights explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MLP_HIDDEN_UNITS = 16


def build_keras_model(kind: str, n_features: int, seed: int = 0) -> Any:
    """`logreg`: one Dense(1, sigmoid). `mlp`: Dense(16, relu) then Dense(1, sigmoid)."""
    import tensorflow as tf

    layers = [tf.keras.layers.Input(shape=(n_features,), dtype=tf.float32)]
    if kind == "mlp":
        layers.append(
            tf.keras.layers.Dense(
                MLP_HIDDEN_UNITS,
                activation="relu",
                kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
                bias_initializer="zeros",
                name="hidden",
            )
        )
    elif kind != "logreg":
        raise ValueError(f"unknown model {kind!r}; expected 'logreg' or 'mlp'")
    layers.append(
        tf.keras.layers.Dense(
            1,
            activation="sigmoid",
            kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1),
            bias_initializer="zeros",
            name="output",
        )
    )
    return tf.keras.Sequential(layers, name=kind)


def initial_weights(kind: str, n_features: int, seed: int) -> list[np.ndarray]:
    return [np.asarray(w) for w in build_keras_model(kind, n_features, seed).get_weights()]


def input_spec(n_features: int) -> Any:
    import tensorflow as tf

    return (
        tf.TensorSpec(shape=[None, n_features], dtype=tf.float32),
        tf.TensorSpec(shape=[None, 1], dtype=tf.float32),
    )


def make_model_fn(kind: str, n_features: int) -> Callable[[], Any]:
    """A no-argument builder of a fresh TFF model; only loss and accuracy as metrics (AUC's
    Keras state would outweigh a small model in every upload; AUC is computed offline)."""

    def model_fn() -> Any:
        import tensorflow as tf
        import tensorflow_federated as tff

        return tff.learning.models.from_keras_model(
            build_keras_model(kind, n_features),
            loss=tf.keras.losses.BinaryCrossentropy(),
            input_spec=input_spec(n_features),
            metrics=[tf.keras.metrics.BinaryAccuracy()],
        )

    return model_fn


def predict(kind: str, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Predicted probabilities (float64 [n]) of a model with the given weights."""
    model = build_keras_model(kind, x.shape[1])
    model.set_weights(weights)
    if len(x) == 0:
        return np.zeros(0)
    return model(x.astype(np.float32), training=False).numpy().reshape(-1).astype(np.float64)


def forward_numpy(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same probabilities as `predict`, in NumPy (cheap enough to score every round):
    Dense layers as (kernel, bias) pairs, ReLU between them, sigmoid at the end."""
    h = x.astype(np.float64)
    pairs = list(zip(weights[0::2], weights[1::2], strict=True))
    for k, (kernel, bias) in enumerate(pairs):
        h = h @ kernel.astype(np.float64) + bias.astype(np.float64)
        if k < len(pairs) - 1:
            h = np.maximum(h, 0.0)
    return (1.0 / (1.0 + np.exp(-h))).reshape(-1)
