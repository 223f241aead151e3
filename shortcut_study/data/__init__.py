"""Data: source datasets, the composite builder, the course-layout reader and the digit oracle."""

from .composite import build_dataset
from .layout import SplitData, load_split

__all__ = ["SplitData", "build_dataset", "load_split"]
