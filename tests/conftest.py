"""Session-wide test setup.

Without CUDA the Triton kernels can only run under the interpreter, and ``TRITON_INTERPRET`` is read
when Triton first binds a ``@triton.jit`` function. The Triton test modules set it at import, but any
module collected earlier that imports ``pecm.kernels`` (e.g. through ``available_backends()``) would
bind the kernels in compiled mode first. Setting it here, before any test module is imported, gives
one consistent mode for the whole session (the same as ``make test-triton``).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
