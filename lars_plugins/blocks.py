"""Blocks of layers from their qualified names alone (no torch: plots of saved histories use it too)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["block_ids"]


def block_ids(names: Sequence[str]) -> dict[str, int]:
    """Depth of each parameter for layer-wise LR decay, from its qualified name alone.

    A parameter belongs to the block named by its path up to and including the first numeric part
    (``blocks.3.attn.qkv.weight`` -> ``blocks.3``; ``encoder.layer.5...`` -> ``encoder.layer.5``;
    ``layer1.0.conv1.weight`` -> ``layer1.0``); blocks are numbered in order of first appearance.
    Everything before the first numbered block (stem, embeddings, tokens) shares depth 0, everything
    after the last one (final norm, head) shares the last depth. A model with no numbered blocks
    gets one depth per top-level module.
    """
    keys = []
    for name in names:
        parts = name.split(".")
        numbered = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        keys.append((".".join(parts[: numbered + 1]), True) if numbered is not None else (parts[0], False))
    if not any(numbered for _, numbered in keys):
        order = list(dict.fromkeys(key for key, _ in keys))
        return {name: order.index(key) for name, (key, _) in zip(names, keys)}
    last = max(i for i, (_, numbered) in enumerate(keys) if numbered)
    blocks = {key: i + 1 for i, key in enumerate(dict.fromkeys(key for key, numbered in keys if numbered))}
    ids, current = {}, 0
    for i, (name, (key, numbered)) in enumerate(zip(names, keys)):
        if numbered:
            current = blocks[key]
        # unnumbered: the stem before the first block is 0, the head after the last one is deepest,
        # anything in between goes with the block before it.
        ids[name] = current if numbered or i < last else len(blocks) + 1
    return ids
