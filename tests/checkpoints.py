"""What every checkpoint test does first: save, then load back as a cautious user would."""

from __future__ import annotations

import io
from typing import Any

import torch


def weights_only_round_trip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
