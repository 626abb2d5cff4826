"""``lars-plugins demo`` and the real data it, the examples, tests and benchmarks train on.

Kept apart from the optimizers: :mod:`.job` is the demo itself (Fashion-MNIST at batch 8,192, LARS
beside linearly scaled SGD; bundled digits when no copy and no network), :mod:`.datasets` the
loaders for data that work offline (bundled Rotten Tomatoes reviews in ``data/``, a pip-installed
MiniLM, local Fashion-MNIST).
"""

from .job import (Digits, accuracy, add_arguments, load_digits, main, make_lars, make_sgd, run_digits_demo,
                  run_fashion_demo, small_cnn, verdict)

__all__ = ["Digits", "accuracy", "add_arguments", "load_digits", "main", "make_lars", "make_sgd", "run_digits_demo",
           "run_fashion_demo", "small_cnn", "verdict"]
