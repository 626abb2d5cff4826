"""Shared test hygiene."""

from __future__ import annotations

import pytest

from lars_plugins.distributed import remove_deepspeed_shm_buffers

# The rendezvous ports of the processes this session starts (tests/test_distributed.py's free_port).
SESSION_PORTS: set[int] = set()


@pytest.fixture(autouse=True)
def remove_this_session_s_deepspeed_shm_buffers():
    """DeepSpeed's CPU all-reduce leaves about 70 MB of shared memory per rank in /dev/shm when its
    processes end, and a suite that runs it dozens of times would fill the machine's memory. After
    each test, what this session's runs left there is removed (module-scoped fixtures' runs too;
    their processes have ended by then). Only this session's: DeepSpeed names each buffer after its
    rendezvous port, and removing another run's (a second pytest on the same machine) while its ranks
    are starting makes them wait for each other forever."""
    yield
    for port in SESSION_PORTS:
        remove_deepspeed_shm_buffers(port)
