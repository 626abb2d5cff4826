"""Shared test hygiene."""

from __future__ import annotations

from pathlib import Path

import pytest

from lars_plugins.distributed import deepspeed_shm_buffers


@pytest.fixture(scope="session")
def shm_before_session() -> set[Path]:
    return deepspeed_shm_buffers()


@pytest.fixture(autouse=True)
def remove_deepspeed_shm_buffers(shm_before_session):
    """DeepSpeed's CPU all-reduce leaves about 70 MB of shared memory per rank in /dev/shm when its
    processes end, and a suite that runs it dozens of times would fill the machine's memory. After
    each test, what runs of this session left there is removed (module-scoped fixtures' runs too);
    a mapping still open in this process stays valid when its name is unlinked."""
    yield
    for leftover in deepspeed_shm_buffers() - shm_before_session:
        leftover.unlink(missing_ok=True)
