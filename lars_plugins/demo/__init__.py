"""``lars-plugins demo`` and the real data it, the examples, tests and benchmarks train on.

Kept apart from the optimizers: :mod:`.job` is the demo itself (Fashion-MNIST at batch 8,192, LARS
beside linearly scaled SGD; bundled digits when no copy and no network), :mod:`.datasets` the
loaders for data that work offline (bundled Rotten Tomatoes reviews in ``data/``, a pip-installed
MiniLM, local Fashion-MNIST).
"""

# The demo's public names, as job.py's __all__ lists them (one list, not two).
from .job import *  # noqa: F403
from .job import __all__  # noqa: F401
