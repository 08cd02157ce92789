"""Everything that makes training fast, in one place: the fast step, its kernels and the module converters.

Nothing outside this package knows these parts exist; the trainer sees a step (``trainer.step_impl``,
:mod:`nemo_lite.training.step`). Triton is imported only by the kernels' own modules.
"""

from nemo_lite.training.fast.step import FastStep, fast_step_missing

__all__ = ["FastStep", "fast_step_missing"]
