"""Communication cost of the federated methods, counted from TFF types (TFF counts no bytes).

Per round and client: down = the broadcast model weights (trainable + non-trainable); up = the
model delta (trainable weights), the client's aggregation weight (one float32) and the
unfinalized training metrics that are summed at the server. Bytes = element count x dtype size.
The serialized size of the weights as TensorProtos is reported beside it. The centralized
alternative ships every site's raw feature table once: the size of the `features.parquet` files.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def type_bytes(tff: ModuleType, type_spec: Any) -> int:
    """Sum over the tensors of a TFF type of (number of elements x dtype size)."""
    if isinstance(type_spec, tff.FederatedType):
        return type_bytes(tff, type_spec.member)
    if isinstance(type_spec, tff.TensorType):
        shape = type_spec.shape if type_spec.shape is not None else (None,)
        if any(dim is None for dim in shape):
            raise ValueError(f"tensor type {type_spec} has an unknown dimension; its size is not static")
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(type_spec.dtype).itemsize
    if isinstance(type_spec, tff.StructType):
        return sum(type_bytes(tff, element) for _, element in tff.structure.iter_elements(type_spec))
    raise TypeError(f"cannot size TFF type {type_spec}")


def protobuf_bytes(weights: list[np.ndarray]) -> int:
    import tensorflow as tf

    return int(sum(tf.make_tensor_proto(w).ByteSize() for w in weights))


def unfinalized_metrics_bytes(model_fn: Any) -> int:
    model = model_fn()  # keep a reference: the tf.function below only holds it weakly
    metrics = model.report_local_unfinalized_metrics()
    return int(
        sum(
            np.asarray(v).nbytes
            for value in metrics.values()
            for v in (value if isinstance(value, list | tuple) else [value])
        )
    )


def communication(
    tff: ModuleType,
    model_fn: Any,
    process: Any,
    weights: list[np.ndarray],
    methods: list[str],
    n_clients: int,
    rounds: int,
    raw_bytes: dict[str, int],
) -> dict[str, Any]:
    weights_type = tff.learning.models.weights_type_from_model(model_fn)
    server_weights_type = process.next.type_signature.parameter[0].member.global_model_weights
    down = type_bytes(tff, server_weights_type)
    up = type_bytes(tff, weights_type.trainable) + 4 + unfinalized_metrics_bytes(model_fn)
    per_round = n_clients * (down + up)
    raw_total = int(sum(raw_bytes.values()))
    return {
        "methods": methods,
        "weights_type": str(weights_type),
        "n_parameters": int(sum(w.size for w in weights)),
        "n_clients": n_clients,
        "rounds": rounds,
        "bytes_down_per_client_per_round": down,
        "bytes_up_per_client_per_round": up,
        "bytes_down_per_round": n_clients * down,
        "bytes_up_per_round": n_clients * up,
        "cumulative_bytes": [per_round * (r + 1) for r in range(rounds)],
        "total_bytes": per_round * rounds,
        "weights_protobuf_bytes": protobuf_bytes(weights),
        "raw_data_bytes": raw_total,
        "raw_data_bytes_per_site": raw_bytes,
        "federated_over_raw": (per_round * rounds / raw_total) if raw_total else None,
        "counting": (
            "down = model weights per client per round; up = trainable delta + float32 client weight + "
            "unfinalized metrics; element count x dtype size from TFF types; raw = features.parquet sizes"
        ),
    }
