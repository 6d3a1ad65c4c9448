"""transferlab: config-driven transfer learning for computer vision."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait lose most of their speed (10x measured) as soon
# as another process shares the cores: a parallel sweep job, a second run, a test suite.
# Sleeping waits keep the speed (docs/performance.md). The runtime reads this once, when
# torch loads it, so it is set here, first; an OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
