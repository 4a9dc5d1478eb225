"""modalmoe: efficient multimodal Mixture-of-Experts learning.

Importing the package changes no process-wide setting; see ``modalmoe.runtime`` for the
allocator switch that the command line turns on.
"""

__version__ = "0.1.0"
