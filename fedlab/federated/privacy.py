"""Client-level differential privacy for the federated methods (DP-FedAvg) and its accounting.

Mechanism: every client's model update is clipped to L2 norm `clip`, the clipped updates are
summed, Gaussian noise of standard deviation `noise_multiplier * clip` is added to the sum and
the result is divided by the expected number of clients per round (the query of TFF's
`DifferentiallyPrivateFactory.gaussian_fixed`). TFF's own Gaussian query draws its noise with an
unseeded random op, which TensorFlow refuses under op determinism (which fedlab enables for
reproducibility); `SeededGaussianSumQuery` therefore draws the noise with a stateless generator
keyed by (noise seed, round, tensor index), so a run is reproducible and every round gets fresh
noise. Adaptive clipping (TFF's `gaussian_adaptive`) draws unseeded noise in several nested
queries; it does not build under op determinism, so a request for it falls back to fixed
clipping and says so in results.json.

Accounting: `dp_accounting`'s RDP accountant over `rounds` compositions of a Poisson-subsampled
Gaussian mechanism with sampling probability clients_per_round / n_sites. fedlab samples a fixed
number of clients per round without replacement, so with sampling the Poisson event is the usual
approximation; with every client in every round (probability 1) it is exact.

Why a warning below 100 sites: client-level DP hides a whole site. The server sees the sum of
at most K clipped updates (norm <= K * clip) plus noise of norm ~ noise_multiplier * clip *
sqrt(d); for a useful model the noise must be small against the signal, i.e. K >> noise_multiplier,
while a meaningful epsilon over tens of rounds needs noise_multiplier of order 1 or more. DP-FedAvg
was shown to work with thousands of clients per round (McMahan et al. 2018); with a handful of
hospitals either epsilon is huge or the model is noise.
"""

from __future__ import annotations

import collections
import math
from typing import Any

MIN_SITES_FOR_MEANINGFUL_DP = 100


def seeded_gaussian_query(
    clip: float, noise_multiplier: float, clients_per_round: int, noise_seed: int
) -> Any:
    """NormalizedQuery(SeededGaussianSumQuery) as in TFF's `gaussian_fixed`, with seeded noise."""
    import tensorflow as tf
    import tensorflow_privacy as tfp

    class SeededGaussianSumQuery(tfp.GaussianSumQuery):
        _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", "round"])

        def make_global_state(self, l2_norm_clip: Any, stddev: Any, round_index: Any = 0) -> Any:
            return self._GlobalState(
                tf.cast(l2_norm_clip, tf.float32), tf.cast(stddev, tf.float32), tf.cast(round_index, tf.int64)
            )

        def initial_global_state(self) -> Any:
            return self.make_global_state(self._l2_norm_clip, self._stddev, 0)

        def get_noised_result(self, sample_state: Any, global_state: Any) -> Any:
            import dp_accounting

            base = tf.stack([tf.constant(noise_seed, tf.int64), global_state.round])
            leaves = tf.nest.flatten(sample_state)
            noised = [
                leaf
                + tf.cast(
                    tf.random.stateless_normal(
                        tf.shape(leaf),
                        seed=tf.random.experimental.stateless_fold_in(base, index),
                        stddev=global_state.stddev,
                    ),
                    leaf.dtype,
                )
                for index, leaf in enumerate(leaves)
            ]
            result = tf.nest.pack_sequence_as(sample_state, noised)
            next_state = global_state._replace(round=global_state.round + 1)
            event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
            return result, next_state, event

    return tfp.NormalizedQuery(
        SeededGaussianSumQuery(l2_norm_clip=clip, stddev=clip * noise_multiplier),
        denominator=float(clients_per_round),
    )


def dp_aggregator(
    tff: Any,
    noise_multiplier: float,
    clip: float,
    clients_per_round: int,
    noise_seed: int,
    record_sum_factory: Any = None,
) -> Any:
    """An unweighted `DifferentiallyPrivateFactory`; `record_sum_factory` sums the clipped records
    (e.g. the 8-bit quantized sum, so quantization and DP compose)."""
    query = seeded_gaussian_query(clip, noise_multiplier, clients_per_round, noise_seed)
    return tff.aggregators.DifferentiallyPrivateFactory(query, record_aggregation_factory=record_sum_factory)


def adaptive_clipping_builds(
    tff: Any, noise_multiplier: float, clients_per_round: int, clip: float
) -> str | None:
    """None when TFF's adaptive-clipping factory builds here, else the reason it does not."""
    import numpy as np

    try:
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise_multiplier=noise_multiplier,
            clients_per_round=float(clients_per_round),
            initial_l2_norm_clip=clip,
            clipped_count_stddev=max(0.05 * clients_per_round, noise_multiplier),
        )
        factory.create(tff.TensorType(np.float32, [2]))
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def epsilon(noise_multiplier: float, sampling_probability: float, rounds: int, delta: float) -> float | None:
    """(epsilon, delta)-DP epsilon of `rounds` subsampled Gaussian steps; None means unbounded."""
    import dp_accounting

    if noise_multiplier <= 0:
        return None
    if not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling probability must be in (0, 1], got {sampling_probability}")
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, rounds)
    value = float(accountant.get_epsilon(delta))
    return value if math.isfinite(value) else None


def warning_for(n_sites: int) -> str | None:
    if n_sites >= MIN_SITES_FOR_MEANINGFUL_DP:
        return None
    return (
        f"client-level DP over {n_sites} sites: each site is one DP 'record', so the noise must hide a "
        f"whole hospital; below {MIN_SITES_FOR_MEANINGFUL_DP} sites either epsilon is very large or the "
        "noise swamps the model (DP-FedAvg assumes hundreds to thousands of clients per round)"
    )


def privacy_record(
    noise_multiplier: float,
    clip: float,
    clients_per_round: int,
    n_sites: int,
    rounds: int,
    delta: float,
    clipping: str,
) -> dict[str, Any]:
    return {
        "noise_multiplier": noise_multiplier,
        "clip": clip,
        "clipping": clipping,
        "clients_per_round": clients_per_round,
        "n_sites": n_sites,
        "sampling_probability": clients_per_round / n_sites,
        "rounds": rounds,
        "delta": delta,
        "epsilon": epsilon(noise_multiplier, clients_per_round / n_sites, rounds, delta),
        "accountant": "dp_accounting RDP, Poisson-subsampled Gaussian composed over rounds",
        "warning": warning_for(n_sites),
    }
