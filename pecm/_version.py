"""The package version: the one place the number lives.

pyproject.toml reads it (``[tool.setuptools.dynamic]``), setup.py passes it to CMake (``-DPECM_VERSION``) so the
compiled extension reports the same string as ``pecm._C.__version__``.
"""

__version__ = "0.1.0"
