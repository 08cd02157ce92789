"""Everything that makes training fast, in one place: the fast step (:mod:`.step`), its kernels and the
module swaps (:mod:`.swaps`).

Nothing outside this package knows these parts exist; the trainer sees a step (``trainer.step_impl``,
:mod:`nemo_lite.training.step_choice`). Triton is imported only by the kernels' own modules. This file
imports nothing, so that importing a submodule never runs another.
"""
