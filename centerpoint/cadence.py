"""When periodic work is due in a run counted in global steps (1-based: step s is done once s batches
are trained): logging, evaluation, checkpoints. Epoch-based intervals are whole multiples of an epoch's
steps; the last step of a run is always due."""

from __future__ import annotations


def itstime(step: int, every: int | None, total: int) -> bool:
    """Whether work done every `every` steps (None or 0: only at the end) is due after `step` of `total`."""
    return step == total or bool(every) and step % every == 0


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The 1-based epoch that global step `step` (>= 1) trains in."""
    return (step - 1) // steps_per_epoch + 1
