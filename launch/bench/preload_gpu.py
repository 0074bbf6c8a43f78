"""Imported once by the `gpu` section's forkserver (`runner_gpu`): the heavy modules every
configuration uses, so each forked configuration starts in well under a second. Nothing here
touches CUDA."""

from loom.launch.bench.workers import preimport

preimport()

import loom.launch.bench.workloads_gpu  # noqa: E402, F401
import loom.launch.train.train_module  # noqa: E402, F401
