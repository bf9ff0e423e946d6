"""Backend registry: "torch" (always), "cpp" (when `pecm._C` is built), "triton" (when Triton imports).

`get_backend(name, device, dtype, grad=False)` resolves ``"auto"``: triton for CUDA tensors, else cpp
when built, else torch; with ``grad=True`` (gradients are needed) a differentiable backend: triton for
CUDA tensors, else torch. The environment variable ``PECM_BACKEND`` (torch | cpp | triton | auto)
overrides what ``"auto"`` picks (not with ``grad=True`` when it names a backend without gradients);
an unknown or unavailable value raises a ValueError that lists the available backends. Loading is
lazy and a backend that fails to import records why (`backend_errors()`), so the package always imports.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, List

import torch

from .base import BY_CHOICES, Backend  # noqa: F401

KNOWN = ("torch", "cpp", "triton")
_LOADERS: Dict[str, Callable[[], Backend]] = {}
_CACHE: Dict[str, Backend] = {}
_ERRORS: Dict[str, str] = {}


def _load_torch() -> Backend:
    from .torch_backend import TorchBackend

    return TorchBackend()


def _load_cpp() -> Backend:
    mod = importlib.import_module("pecm.backends.cpp_backend")
    return mod.CppBackend()


def _load_triton() -> Backend:
    mod = importlib.import_module("pecm.backends.triton_backend")
    return mod.TritonBackend()


_LOADERS.update(torch=_load_torch, cpp=_load_cpp, triton=_load_triton)


def _try(name: str):
    if name in _CACHE:
        return _CACHE[name]
    if name in _ERRORS:
        return None
    try:
        _CACHE[name] = _LOADERS[name]()
        return _CACHE[name]
    except Exception as e:  # import errors, missing extension, missing triton
        _ERRORS[name] = f"{type(e).__name__}: {e}"
        return None


def available_backends() -> List[str]:
    """Names of the backends that load on this host, in preference order ["torch", "cpp", "triton"]."""
    return [n for n in KNOWN if _try(n) is not None]


def backend_errors() -> Dict[str, str]:
    """Why each unavailable backend failed to load (name -> error message)."""
    available_backends()
    return dict(_ERRORS)


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend_by_name(name: str) -> Backend:
    """The loaded backend ``name`` (already resolved and checked by `get_backend`)."""
    be = _CACHE.get(name)
    return be if be is not None else get_backend(name, torch.device("cpu"), torch.float32)


_DIFFERENTIABLE = ("torch", "triton")


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device_type: str, dtype: torch.dtype, grad: bool) -> str:
    """The name `get_backend` resolves to (loads and checks the backend; raises like it).

    Under torch.compile the result is a constant of the compiled graph (the backend is chosen, and
    ``PECM_BACKEND`` read, when the function is compiled).
    """
    return get_backend(name, torch.device(device_type), dtype, grad).name


def get_backend(name: str, device: torch.device, dtype: torch.dtype, grad: bool = False) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    chosen = name
    if name == "auto":
        env = os.environ.get("PECM_BACKEND", "").strip()
        if env and env != "auto":
            if env not in KNOWN:
                raise ValueError(f"PECM_BACKEND: expected one of {('auto',) + KNOWN}, got {env!r}")
        if env and env != "auto" and not (grad and env not in _DIFFERENTIABLE):
            chosen = env
        elif dtype == torch.float64:  # float64 (e.g. gradcheck) accumulates in float64: torch only
            chosen = "torch"
        elif device.type == "cuda" and _try("triton") is not None:
            chosen = "triton"
        elif device.type == "cpu" and not grad and _try("cpp") is not None:
            chosen = "cpp"
        else:
            chosen = "torch"
    if chosen not in KNOWN:
        raise ValueError(f"backend: expected one of {('auto',) + KNOWN}, got {chosen!r}")
    be = _try(chosen)
    if be is None:
        raise ValueError(
            f"backend: {chosen!r} is not available on this host ({_ERRORS.get(chosen)}); "
            f"available: {available_backends()}"
        )
    if not be.supports(device, dtype):
        if dtype == torch.float64:
            raise TypeError(f"c: float64 inputs are supported by backend='torch' only, not {chosen!r}")
        raise ValueError(f"backend: {chosen!r} does not support device={device.type} dtype={dtype}")
    if grad and not be.differentiable:
        raise ValueError(f"backend: {chosen!r} is not differentiable; use backend='torch' or 'triton'")
    return be
