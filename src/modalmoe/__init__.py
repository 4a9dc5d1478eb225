"""modalmoe: efficient multimodal Mixture-of-Experts learning.

Importing the package changes no process-wide setting; see ``modalmoe.runtime`` for the
allocator switch that the command line turns on.
"""

__version__ = "0.1.0"

# The built-in routers register on import, so that a config naming an unknown router is
# refused when it is validated (``modalmoe.config`` sits below ``moe`` and cannot import it).
from modalmoe.moe import routers as _routers  # noqa: E402, F401
