"""Communication cost of the federated methods, counted from TFF types (TFF counts no bytes).

Per round and client: down = the broadcast model weights (trainable + non-trainable); up = the
model delta (trainable weights), the client's aggregation weight (one float32) and the
unfinalized training metrics that are summed at the server. Bytes = element count x dtype size.
The serialized size of the weights as TensorProtos is reported beside it. The centralized
alternative ships every site's raw feature table once: the size of the `features.parquet` files.
"""

from __future__ import annotations

from pathlib import Path
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


def _byte_counts(
    weights: list[np.ndarray], n_clients: int, participants: int, rounds: int, down: int, up: int,
    raw_bytes: dict[str, int],
) -> dict[str, Any]:
    """The keys every communication summary shares: per-client, per-round, cumulative and total bytes."""
    per_round = participants * (down + up)
    raw_total = int(sum(raw_bytes.values()))
    return {
        "n_parameters": int(sum(w.size for w in weights)),
        "n_clients": n_clients,
        "clients_per_round": participants,
        "rounds": rounds,
        "bytes_down_per_client_per_round": down,
        "bytes_up_per_client_per_round": up,
        "bytes_down_per_round": participants * down,
        "bytes_up_per_round": participants * up,
        "cumulative_bytes": [per_round * (r + 1) for r in range(rounds)],
        "total_bytes": per_round * rounds,
        "weights_protobuf_bytes": protobuf_bytes(weights),
        "raw_data_bytes": raw_total,
        "raw_data_bytes_per_site": raw_bytes,
        "federated_over_raw": (per_round * rounds / raw_total) if raw_total else None,
    }


def communication(
    tff: ModuleType,
    model_fn: Any,
    process: Any,
    weights: list[np.ndarray],
    methods: list[str],
    n_clients: int,
    rounds: int,
    raw_bytes: dict[str, int],
    clients_per_round: int | None = None,
) -> dict[str, Any]:
    """Per-round and total bytes of a TFF method; `clients_per_round` clients take part per round."""
    weights_type = tff.learning.models.weights_type_from_model(model_fn)
    server_weights_type = process.next.type_signature.parameter[0].member.global_model_weights
    down = type_bytes(tff, server_weights_type)
    up = type_bytes(tff, weights_type.trainable) + 4 + unfinalized_metrics_bytes(model_fn)
    counts = _byte_counts(weights, n_clients, clients_per_round or n_clients, rounds, down, up, raw_bytes)
    return {
        "methods": methods,
        "weights_type": str(weights_type),
        **counts,
        "counting": (
            "down = model weights per client per round; up = trainable delta + float32 client weight + "
            "unfinalized metrics; element count x dtype size from TFF types; raw = features.parquet sizes"
        ),
    }


def scaffold_round_bytes(tff: ModuleType, process: Any, model_fn: Any) -> tuple[int, int]:
    """SCAFFOLD bytes per client per round from its types: down = the broadcast model and server
    control variate; up = model delta + control delta (unweighted mean: no client weight) + the
    unfinalized training metrics. The client's own control variate stays at the client."""
    state = process.next.type_signature.parameter[0].member
    down = type_bytes(tff, state.global_model_weights) + type_bytes(tff, state.control)
    trainable = tff.learning.models.weights_type_from_model(model_fn).trainable
    return down, 2 * type_bytes(tff, trainable) + unfinalized_metrics_bytes(model_fn)


def sequential_communication(
    weights: list[np.ndarray], n_clients: int, visits_per_round: int, rounds: int, raw_bytes: dict[str, int]
) -> dict[str, Any]:
    """The same keys as `communication` for a run of Cyclic alone (weights passed site to site)."""
    hop = int(sum(w.nbytes for w in weights))
    return {
        "methods": ["cyclic"],
        **_byte_counts(weights, n_clients, visits_per_round, rounds, hop, 0, raw_bytes),
        "counting": "cyclic: one transfer of the model weights per site visit (site to site)",
    }


def centralized_bytes(export_dirs: dict[str, Path], parquet_bytes: dict[str, int]) -> dict[str, int]:
    """What centralizing would ship: the raw Bulk Data NDJSON export (when present) and the
    Parquet feature tables, summed over sites."""
    out = {"parquet_features": int(sum(parquet_bytes.values()))}
    ndjson = [f for folder in export_dirs.values() if folder.is_dir() for f in folder.glob("*.ndjson")]
    if ndjson and all(folder.is_dir() for folder in export_dirs.values()):
        out["ndjson_export"] = int(sum(f.stat().st_size for f in ndjson))
    return out


def crossover_patients(federated_bytes: float, centralized: float, n_patients: int) -> float | None:
    """Population at which centralizing costs as much as the federated run, assuming centralized
    bytes grow linearly with patients and federated bytes do not; above it federated is cheaper."""
    if centralized <= 0 or n_patients <= 0:
        return None
    return float(federated_bytes * n_patients / centralized)
