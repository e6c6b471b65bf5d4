"""One replica of a replicated run's checkpoint as an ordinary single-model checkpoint."""

from __future__ import annotations

from pathlib import Path

from centerpoint.checkpoint import load_checkpoint, save_checkpoint
from centerpoint.classes import checkpoint_classes
from centerpoint.errors import CenterpointError
from centerpoint.replicas.settings import replica_spec, replica_state
from centerpoint.spec import ExperimentSpec
from centerpoint.state import unflatten_state


def extract_replica(src: Path, dst: Path, index: int) -> ExperimentSpec:
    """Write replica `index` of the checkpoint `src` to `dst` (atomically): its state (hyperparameter
    entries dropped), the spec `replica_spec` gives, the same position, data identity and classes, and that
    replica's row of the stored evaluation as its metrics. Returns the written spec."""
    ckpt = load_checkpoint(src)
    k = ckpt.spec.train.replicas
    if k == 1:
        raise CenterpointError(f"{src}: not a replicated run's checkpoint (train.replicas is 1); use it as it is")
    if not 0 <= index < k:
        raise CenterpointError(f"--replica {index}: {src} holds replicas 0 .. {k - 1}")
    state = replica_state(unflatten_state(ckpt.tensors), index)
    spec = replica_spec(ckpt.spec, index)
    rows = [r for r in ckpt.metrics.get("replicas", []) if isinstance(r, dict) and r.get("replica") == index]
    metrics = rows[0] if rows else {}
    save_checkpoint(dst, state, spec, ckpt.epoch, ckpt.batch_in_epoch, metrics, "", ckpt.data,
                    checkpoint_classes(ckpt))
    return spec
