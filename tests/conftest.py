"""Session-wide test setup.

Without CUDA the Triton kernels can only run under the interpreter, and ``TRITON_INTERPRET`` is read
when Triton first binds a ``@triton.jit`` function. The Triton test modules set it at import, but any
module collected earlier that imports ``pecm.kernels`` (e.g. through ``available_backends()``) would
bind the kernels in compiled mode first. Setting it here, before any test module is imported, gives
one consistent mode for the whole session (the same as ``make test-triton``). With CUDA it sets
``PECM_TRITON_CONFIG=pinned`` when unset (docs/triton.md, "GPU readiness").

Also the ``simd`` fixture shared by the C++ extension tests.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # GPU test runs: one fixed config per kernel (a handful of compiles, no autotune benchmarking);
    # autotuning is for the benchmarks (bench/). Set PECM_TRITON_CONFIG=autotune to test the tuned configs.
    os.environ.setdefault("PECM_TRITON_CONFIG", "pinned")

try:
    from pecm import _C
except ImportError:  # the extension is optional; the tests that need it importorskip it
    _C = None


@pytest.fixture(params=_C.simd_levels() if _C is not None else ["unbuilt"])
def simd(request):
    """Runs a test once per SIMD path of `pecm._C` this CPU supports (scalar, avx2, avx512)."""
    if _C is None:
        pytest.skip("pecm._C is not built")
    before = _C.simd_level()
    _C.set_simd(request.param)
    yield request.param
    _C.set_simd(before)
