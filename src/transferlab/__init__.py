"""transferlab: config-driven transfer learning for computer vision."""

from pathlib import Path

__version__ = "0.1.0"

# The package's configs: src/transferlab/conf links to the repository's conf/, and a wheel
# carries them as package data, so every command works from any folder.
CONF_DIR = Path(__file__).resolve().parent / "conf"
