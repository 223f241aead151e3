"""Data: source datasets, the composite builder, the course-layout reader and the digit oracle.

The builder (torchvision, scikit-learn) loads on first use: reading a dataset, which every command
does, should not pay for building one (several seconds of imports on a slow machine).
"""

from .layout import SplitData, load_split

__all__ = ["SplitData", "build_dataset", "load_split"]


def __getattr__(name: str):
    if name == "build_dataset":
        from .composite import build_dataset

        return build_dataset
    raise AttributeError(name)
