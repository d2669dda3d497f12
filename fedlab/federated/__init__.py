"""Simulated multi-site training with TensorFlow Federated, against Local-k and Pooled baselines.

`train(exp, run, methods, progress)` is the stage entry point; see `fedlab.federated.train`.
"""

from fedlab.federated.train import train

__all__ = ["train"]
