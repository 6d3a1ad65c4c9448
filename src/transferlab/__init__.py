"""transferlab: config-driven transfer learning for computer vision."""

__version__ = "0.1.0"
