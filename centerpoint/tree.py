"""Helpers for train-state trees: flat dicts of tensors keyed by dotted names, grouped by a prefix."""

from __future__ import annotations

from torch import Tensor

Tree = dict[str, Tensor]


def flatten(groups: dict[str, Tree]) -> Tree:
    """{'params': {'a.b': t}} -> {'params.a.b': t}."""
    return {f"{group}.{name}": value for group, tree in groups.items() for name, value in tree.items()}


def unflatten(flat: Tree, groups: tuple[str, ...]) -> dict[str, Tree]:
    """Inverse of `flatten` for the given group names; keys of other groups raise KeyError."""
    out: dict[str, Tree] = {g: {} for g in groups}
    for key, value in flat.items():
        group, _, name = key.partition(".")
        if group not in out:
            raise KeyError(f"tensor {key!r} belongs to no group of {groups}")
        out[group][name] = value
    return out


def num_elements(tree: Tree) -> int:
    """Total element count of all leaves."""
    return sum(v.numel() for v in tree.values())
