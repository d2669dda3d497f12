"""FedProx's client optimizer: SGD on the local loss plus (mu/2)·||w - w_global||².

TFF 0.87's `build_weighted_fed_prox` adds `mu * (w_global - w)` to the gradient, the negative of
the proximal gradient, which pushes clients *away* from the global model (checked against plain
Keras in tests/test_federated.py). fedlab therefore runs FedProx as `build_weighted_fed_avg`
with this client optimizer: the step is w <- w - lr * (g + mu * (w - w_anchor)), where the
anchor is the weight at the client's first step of the round, i.e. the broadcast global model
(TFF initializes the client optimizer at the start of every client update).
"""

from __future__ import annotations

import collections
from typing import Any


def build_proximal_sgd(learning_rate: float, proximal_strength: float) -> Any:
    """A `tff.learning.optimizers.Optimizer` doing proximal SGD (FedProx local solver)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    if proximal_strength < 0:
        raise ValueError(f"proximal_strength must be >= 0, got {proximal_strength}")

    class ProximalSGD(tff.learning.optimizers.Optimizer):
        def initialize(self, specs: Any) -> collections.OrderedDict:
            return collections.OrderedDict(
                learning_rate=learning_rate,  # a Python float: TFF reads hparams outside TF
                step=tf.constant(0, tf.int64),
                anchor=tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), specs),
            )

        def next(self, state: Any, weights: Any, gradients: Any) -> tuple[Any, Any]:
            first_step = tf.equal(state["step"], 0)
            anchor = tf.nest.map_structure(lambda w, a: tf.where(first_step, w, a), weights, state["anchor"])
            lr = state["learning_rate"]

            def update(w: Any, g: Any, a: Any) -> Any:
                return w - tf.cast(lr, w.dtype) * (g + tf.cast(proximal_strength, w.dtype) * (w - a))

            updated = tf.nest.map_structure(update, weights, gradients, anchor)
            new_state = collections.OrderedDict(learning_rate=lr, step=state["step"] + 1, anchor=anchor)
            return new_state, updated

        def get_hparams(self, state: Any) -> collections.OrderedDict:
            return collections.OrderedDict(learning_rate=state["learning_rate"])

        def set_hparams(self, state: Any, hparams: Any) -> collections.OrderedDict:
            return collections.OrderedDict(
                learning_rate=hparams["learning_rate"], step=state["step"], anchor=state["anchor"]
            )

    return ProximalSGD()
