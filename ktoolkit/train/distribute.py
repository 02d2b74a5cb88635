"""Choosing the tf.distribute strategy (called the *distribution* in code, as opposed to the transfer
strategy of `ktool finetune`).

``auto`` takes MirroredStrategy over all visible GPUs when there is at least one, the default
strategy otherwise. ``multiworker`` reads the cluster from ``TF_CONFIG``, so Kubernetes, Slurm and
cloud launchers run the same command on every worker.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def make_distribution(kind: str = "auto"):
    """Returns ``(distribution, description)``: the tf.distribute strategy for ``kind`` (auto, none,
    mirrored, multiworker)."""
    import tensorflow as tf

    if kind == "multiworker":  # first: it must configure the runtime before anything starts it
        config = os.environ.get("TF_CONFIG")
        if not config:
            raise ValueError(
                "distribute='multiworker' needs the cluster in the TF_CONFIG environment variable, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}; '
                "see the README's multi-machine section."
            )
        try:
            task = json.loads(config).get("task", {})
        except json.JSONDecodeError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from err
        distribution = tf.distribute.MultiWorkerMirroredStrategy()
        return distribution, (
            f"MultiWorkerMirroredStrategy, {distribution.num_replicas_in_sync} replicas, this is "
            f"{task.get('type', 'worker')} {task.get('index', 0)}"
        )
    has_gpu = bool(tf.config.list_physical_devices("GPU"))  # physical: does not start the runtime
    if kind == "auto":
        kind = "mirrored" if has_gpu else "none"
    if kind == "none":
        return tf.distribute.get_strategy(), f"default strategy on {'GPU' if has_gpu else 'CPU'}"
    if kind == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if has_gpu else "CPU")]
        distribution = tf.distribute.MirroredStrategy(devices=devices)
        return distribution, f"MirroredStrategy over {len(devices)} device(s): {', '.join(devices)}"
    raise ValueError(f"distribute={kind!r}: use one of auto, none, mirrored, multiworker.")


def is_chief(distribution) -> bool:
    """True on the worker that writes the run folder (every single-machine run)."""
    resolver = getattr(distribution, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0
