"""SCAFFOLD (Karimireddy et al., ICML 2020): FedAvg with control variates against client drift.

Algorithm 1 of the paper with option II control variates, built from `tff.learning`'s templates
(TFF 0.87 ships no SCAFFOLD):

- server state: the global model x and the server control variate c (zeros at start);
- client state: each client's control variate c_i (zeros at start). TFF's learning processes
  have stateless clients, so the process takes the clients' control variates as a
  CLIENTS-placed argument and returns the new ones CLIENTS-placed: in a deployment each
  hospital keeps its own c_i; in this simulation the driver (`train_scaffold`) holds them per
  site and hands each one back to its own client only. c_i never reaches the server;
- distribution (`tff.learning.templates.build_broadcast_process`): (x, c) to every participant;
- client work (a `tff.learning.templates.ClientWorkProcess`): from y_i = x, K local steps
  y_i <- y_i - lr * (g_i(y_i) - c_i + c) on the client's batches, then
  c_i+ = c_i - c + (x - y_i) / (K * lr)  (option II) and the update (x - y_i, c_i+ - c_i);
- aggregation (`tff.aggregators.UnweightedMeanFactory`): the plain mean over participants of
  both parts, as in the paper (fedlab's FedAvg weights by examples processed, which with a
  fixed step budget is the same unless a site has fewer rows than one batch);
- finalizer (`tff.learning.templates.build_apply_optimizer_finalizer`, server SGD at
  `server_lr`, the paper's global step size eta_g): x <- x - eta_g * mean(x - y_i); and
  c <- c + (|S| / N) * mean(c_i+ - c_i) over the |S| participants of N clients.

The model's own loss (with any regularization the model builder adds) gives g_i. The update
sent up is twice the size of FedAvg's (model delta and control delta); the broadcast is twice
the model (x and c); `fedlab.federated.comms` counts both from this process's types.
"""

from __future__ import annotations

import collections
import time
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from fedlab.federated.data import SiteSplit, make_dataset
from fedlab.federated.fedavg import RoundCallback, client_schedule
from fedlab.federated.local import Trained, client_batches


class ScaffoldState(NamedTuple):
    """What the SCAFFOLD process keeps at the server between rounds."""

    global_model_weights: Any
    control: Any
    distributor: Any
    client_work: Any
    aggregator: Any
    finalizer: Any


class ScaffoldProcess(NamedTuple):
    """`process.next(state, client_data, client_controls) -> (state, client_controls, metrics)`;
    `initial_controls()` gives one client's zero control variate."""

    process: Any  # a tff.templates.IterativeProcess
    control_zeros: list[np.ndarray]
    n_clients: int

    def initialize(self, init: list[np.ndarray]) -> Any:
        return set_model_weights(self.process.initialize(), init)

    def next(self, state: Any, client_data: list[Any], client_controls: list[Any]) -> Any:
        return self.process.next(state, client_data, client_controls)

    def initial_controls(self) -> list[np.ndarray]:
        return [np.zeros_like(z) for z in self.control_zeros]


def set_model_weights(state: Any, trainable: list[np.ndarray]) -> Any:
    """The server state with its model's trainable weights replaced (non-trainable kept)."""
    import tensorflow_federated as tff

    weights = state.global_model_weights if hasattr(state, "global_model_weights") else state[0]
    replaced = tff.learning.models.ModelWeights(
        trainable=[np.asarray(w) for w in trainable], non_trainable=list(weights.non_trainable)
    )
    fields = list(state) if isinstance(state, tuple) else [state[k] for k in range(len(state))]
    return ScaffoldState(replaced, *fields[1:])


def model_weights(state: Any) -> list[np.ndarray]:
    weights = state.global_model_weights if hasattr(state, "global_model_weights") else state[0]
    return [np.asarray(w) for w in weights.trainable]


def build_client_work(tff: ModuleType, model_fn: Any, learning_rate: float) -> Any:
    """The SCAFFOLD `ClientWorkProcess`: input (model weights, c, c_i) at each client."""
    import tensorflow as tf

    with tf.Graph().as_default():
        probe = model_fn()
        metrics_aggregation = tff.learning.metrics.sum_then_finalize(probe.metric_finalizers())
        weights_type = tff.learning.models.weights_type_from_model(probe)
        data_type = tff.SequenceType(tff.types.tensorflow_to_type(probe.input_spec))
    control_type = weights_type.trainable
    incoming_type = tff.StructWithPythonType(
        [("model", weights_type), ("control", control_type), ("client_control", control_type)],
        collections.OrderedDict,
    )

    @tff.federated_computation
    def init_fn() -> Any:
        return tff.federated_value(collections.OrderedDict(learning_rate=float(learning_rate)), tff.SERVER)

    state_type = init_fn.type_signature.result.member

    @tff.tensorflow.computation(state_type, incoming_type, data_type)
    def client_update(hparams: Any, incoming: Any, dataset: Any) -> Any:
        return _client_update_fn(model_fn)(hparams["learning_rate"], incoming, dataset)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(incoming_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(state: Any, incoming: Any, client_data: Any) -> Any:
        result, outputs = tff.federated_map(client_update, (tff.federated_broadcast(state), incoming, client_data))
        measurements = tff.federated_zip(collections.OrderedDict(train=metrics_aggregation(outputs)))
        return tff.templates.MeasuredProcessOutput(state, result, measurements)

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def _client_update_fn(model_fn: Any) -> Any:
    """A tf.function running one client's K corrected SGD steps (option II control variates)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    model = model_fn()
    weights = tff.learning.models.ModelWeights.from_model(model)

    @tf.function
    def update(learning_rate: Any, incoming: Any, dataset: Any) -> Any:
        tf.nest.map_structure(lambda v, t: v.assign(t), weights, incoming["model"])
        start = incoming["model"].trainable
        correction = tf.nest.map_structure(tf.subtract, incoming["control"], incoming["client_control"])
        lr = tf.cast(learning_rate, tf.float32)
        steps = tf.constant(0, tf.int64)
        for batch in iter(dataset):
            with tf.GradientTape() as tape:
                output = model.forward_pass(batch, training=True)
            gradients = tape.gradient(output.loss, weights.trainable)
            for variable, gradient, fix in zip(weights.trainable, gradients, correction, strict=True):
                variable.assign_sub(lr * (gradient + fix))
            steps += 1
        delta = tf.nest.map_structure(tf.subtract, start, weights.trainable)
        scale = 1.0 / (tf.cast(tf.maximum(steps, 1), tf.float32) * lr)
        # option II: c_i+ - c_i = -c + (x - y_i) / (K * lr)
        control_delta = tf.nest.map_structure(lambda d, c: d * scale - c, delta, incoming["control"])
        result = tff.learning.templates.ClientResult(
            update=collections.OrderedDict(model=delta, control=control_delta),
            update_weight=tf.constant(1.0, tf.float32),
        )
        return result, model.report_local_unfinalized_metrics()

    return update


def build_scaffold(
    tff: ModuleType, model_fn: Any, client_lr: float, server_lr: float = 1.0, n_clients: int = 1
) -> ScaffoldProcess:
    """The SCAFFOLD iterative process for `n_clients` clients in all (any number per round)."""
    import tensorflow as tf

    with tf.Graph().as_default():
        probe = model_fn()
        weights_type = tff.learning.models.weights_type_from_model(probe)
        initial = tff.learning.models.ModelWeights.from_model(probe)
        zeros = [np.zeros(v.shape, v.dtype.as_numpy_dtype) for v in initial.trainable]
    control_type = weights_type.trainable
    broadcast_type = tff.StructWithPythonType(
        [("model", weights_type), ("control", control_type)], collections.OrderedDict
    )
    distributor = tff.learning.templates.build_broadcast_process(broadcast_type)
    client_work = build_client_work(tff, model_fn, client_lr)
    update_type = client_work.next.type_signature.result.result.member.update
    aggregator = tff.aggregators.UnweightedMeanFactory().create(update_type)
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        tff.learning.optimizers.build_sgdm(learning_rate=server_lr), weights_type
    )

    @tff.tensorflow.computation
    def initial_weights() -> Any:
        model = model_fn()
        return tff.learning.models.ModelWeights.from_model(model)

    @tff.tensorflow.computation
    def zero_control() -> Any:
        return [tf.zeros(z.shape, z.dtype) for z in zeros]

    @tff.federated_computation
    def init_fn() -> Any:
        return tff.federated_zip(ScaffoldState(
            tff.federated_eval(initial_weights, tff.SERVER),
            tff.federated_eval(zero_control, tff.SERVER),
            distributor.initialize(), client_work.initialize(), aggregator.initialize(), finalizer.initialize(),
        ))

    state_type = init_fn.type_signature.result
    data_type = client_work.next.type_signature.parameter[2]

    @tff.tensorflow.computation(control_type, control_type)
    def add(control: Any, delta: Any) -> Any:
        return tf.nest.map_structure(tf.add, control, delta)

    @tff.tensorflow.computation(control_type, control_type, np.float32)
    def server_control_step(control: Any, mean_delta: Any, participation: Any) -> Any:
        return tf.nest.map_structure(lambda c, d: c + participation * d, control, mean_delta)

    @tff.tensorflow.computation(weights_type, control_type)
    def pack(model: Any, control: Any) -> Any:
        return collections.OrderedDict(model=model, control=control)

    @tff.tensorflow.computation(broadcast_type, control_type)
    def unpack(broadcast: Any, client_control: Any) -> Any:
        return collections.OrderedDict(model=broadcast["model"], control=broadcast["control"],
                                       client_control=client_control)

    @tff.federated_computation(state_type, data_type, tff.FederatedType(control_type, tff.CLIENTS))
    def next_fn(state: Any, client_data: Any, client_controls: Any) -> Any:
        sent = distributor.next(
            state.distributor, tff.federated_map(pack, (state.global_model_weights, state.control))
        )
        incoming = tff.federated_map(unpack, (sent.result, client_controls))
        work = client_work.next(state.client_work, incoming, client_data)
        mean = aggregator.next(state.aggregator, work.result.update)
        finished = finalizer.next(state.finalizer, state.global_model_weights, mean.result.model)
        participation = tff.federated_map(_participation(tff, n_clients), tff.federated_sum(
            tff.federated_value(1.0, tff.CLIENTS)))
        control = tff.federated_map(server_control_step, (state.control, mean.result.control, participation))
        new_client_controls = tff.federated_map(add, (client_controls, work.result.update.control))
        new_state = tff.federated_zip(ScaffoldState(
            finished.result, control, sent.state, work.state, mean.state, finished.state
        ))
        metrics = tff.federated_zip(collections.OrderedDict(
            distributor=sent.measurements, client_work=work.measurements,
            aggregator=mean.measurements, finalizer=finished.measurements,
        ))
        return new_state, new_client_controls, metrics

    return ScaffoldProcess(tff.templates.IterativeProcess(init_fn, next_fn), zeros, n_clients)


def _participation(tff: ModuleType, n_clients: int) -> Any:
    """|S| / N from the number of clients that took part (summed at the server)."""

    @tff.tensorflow.computation(np.float32)
    def fraction(participants: Any) -> Any:
        return participants / float(n_clients)

    return fraction


def train_scaffold(
    tff: ModuleType,
    process: ScaffoldProcess,
    init: list[np.ndarray],
    splits: list[SiteSplit],
    scaled_train: list[np.ndarray],
    exp_seed: int,
    seed: int,
    cfg: Any,
    on_round: RoundCallback | None = None,
    rounds: int | None = None,
) -> Trained:
    """SCAFFOLD for `rounds` (default `cfg.rounds`) rounds on the batch streams FedAvg uses."""
    start = time.perf_counter()
    rounds = cfg.rounds if rounds is None else rounds
    n_steps = rounds * cfg.local_steps
    streams = [client_batches(exp_seed, seed, split, cfg.batch_size, n_steps) for split in splits]
    state = process.initialize(init)
    controls = [process.initial_controls() for _ in splits]  # each client's own c_i
    picks = client_schedule(exp_seed, seed, len(splits), cfg.clients_per_round, rounds)
    history, round_seconds = [], []
    for r in range(rounds):
        window = slice(r * cfg.local_steps, (r + 1) * cfg.local_steps)
        data = [make_dataset(scaled_train[k], splits[k].y_train, streams[k][window]) for k in picks[r]]
        round_start = time.perf_counter()
        state, updated, metrics = process.next(state, data, [controls[k] for k in picks[r]])
        round_seconds.append(time.perf_counter() - round_start)
        for k, control in zip(picks[r], updated, strict=True):
            controls[k] = [np.asarray(c) for c in control]
        history.append(float(metrics["client_work"]["train"]["loss"]))
        if on_round is not None:
            on_round(r, model_weights(state), history[-1])
    train_sites = "+".join(s.site for s in splits)
    return Trained("scaffold", train_sites, model_weights(state), history, time.perf_counter() - start,
                   round_seconds)
