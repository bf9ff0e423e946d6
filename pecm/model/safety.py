"""Validating readers for the files of a checkpoint: JSON objects and safetensors state dicts.

Everything a checkpoint holds is JSON or safetensors (plain arrays); nothing is unpickled. These helpers turn
every damaged or hostile file into a one-line ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` that names
the file and what is wrong (the CLI prints it and exits 2), instead of a raw exception or a silently wrong model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping

import torch


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (library errors are often multi-line), cut to ``limit`` characters."""
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def read_json_object(path: str, what: str) -> Dict[str, Any]:
    """A JSON object from ``path`` (``what`` says which file it is in the error messages)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: {path} not found ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint: {path} is not valid JSON ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise TypeError(f"checkpoint: {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str, what: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: {path} not found ({what})")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error type for a truncated / damaged file
        raise ValueError(f"checkpoint: {path} is not a readable safetensors file ({one_line(e)})") from e


def check_state_dict(
    path: str, sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], partial: bool = False, hint: str = ""
) -> None:
    """``sd`` (read from ``path``) has exactly the keys of ``own`` (a subset when ``partial``), each with the same
    shape and dtype, and no NaN/inf in floating tensors; otherwise a ValueError naming the file and the key."""
    unexpected = sorted(set(sd) - set(own))
    missing = [] if partial else sorted(set(own) - set(sd))
    if unexpected or missing:
        more = (" ..." if len(missing) > 5 else "", " ..." if len(unexpected) > 5 else "")
        raise ValueError(
            f"checkpoint: {path} does not fit the model built from its config{hint}: missing keys {missing[:5]}"
            f"{more[0]}, unexpected keys {unexpected[:5]}{more[1]}"
        )
    for k, v in sd.items():
        ref = own[k]
        if v.dtype != ref.dtype or tuple(v.shape) != tuple(ref.shape):
            raise ValueError(
                f"checkpoint: {path}: {k}: expected {str(ref.dtype).replace('torch.', '')} {list(ref.shape)}, got"
                f" {str(v.dtype).replace('torch.', '')} {list(v.shape)}{hint}"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"checkpoint: {path}: {k}: contains NaN or infinite values")
