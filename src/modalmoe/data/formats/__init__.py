"""Users' own data: the documented directory format (``manifest``) and MultiBench's layouts.

    from modalmoe.data import load
    task = load("path/to/my-task")        # a directory with manifest.yaml

See ``manifest.py`` for the directory format and ``multibench.py`` for AV-MNIST's numpy
files and the affect pickles.
"""

from modalmoe.data.formats.manifest import (
    MANIFEST,
    DataFormatError,
    DataFormatWarning,
    UntrustedPickleError,
    load,
    save,
)
from modalmoe.data.formats.multibench import load_multibench_affect, load_multibench_avmnist

__all__ = [
    "MANIFEST",
    "DataFormatError",
    "DataFormatWarning",
    "UntrustedPickleError",
    "load",
    "load_multibench_affect",
    "load_multibench_avmnist",
    "save",
]
