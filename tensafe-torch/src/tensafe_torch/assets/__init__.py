"""Files shipped with tensafe-torch: the embedded tiny model and its default dataset.

Both are built reproducibly by ``tensafe-torch/scripts/build_tiny_model.py``
from Python's own ``pydoc_data`` corpus; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_MODEL = HERE / "tiny-llama"
DEFAULT_DATASET = HERE / "default_dataset.jsonl"
