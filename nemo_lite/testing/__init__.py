"""What tests and benchmarks use and training never does: tiny checkpoints, synthetic loaders, fixtures.

Nothing under ``nemo_lite/components`` or ``nemo_lite/training`` imports this package.
"""
