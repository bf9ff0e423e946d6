"""``train_state.pt``: what ``resume=True`` continues from, written with ``torch.save`` and read back ONLY with
``torch.load(weights_only=True)`` (PyTorch's allow-listed unpickler: tensors, dicts, lists, numbers, strings;
a pickled object with a ``__reduce__`` payload is refused, never run).

Contents (all plain values): ``optimizer`` (`torch.optim.Optimizer.state_dict`: tensors + param groups),
``scheduler`` (`LambdaLR.state_dict`: numbers and lists), ``epoch`` (last finished, 0-based), ``history`` (the
per-epoch records, as in metrics.json), ``train_config`` (`TrainConfig` as a dict) and ``best`` (``{"epoch",
"rsum"}`` for ``select_best``). `load_train_state` validates all of it against the optimizer and scheduler of the
run being resumed (keys, types, tensor shapes and dtypes, finite values) and raises a one-line ValueError /
TypeError naming the file and the field, so ``pecm train --resume`` exits 2 on a damaged or hostile file.
"""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import List, Tuple

import torch

from .model.safety import one_line

KEYS = ("optimizer", "scheduler", "epoch", "history")  # required; "train_config" and "best" are optional


def _num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a refused global), RuntimeError (truncated zip), EOFError, ...
        g = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        why = (
            f"it pickles the global {g.group(1)}, which the weights-only unpickler refuses (not run): a training"
            " state holds only tensors, numbers, strings and containers"
            if g
            else one_line(e)
        )
        raise ValueError(
            f"--resume: {path} is not a loadable training state (read with torch.load(weights_only=True)): {why}"
        ) from e


def _check_optimizer(path: str, st, opt: torch.optim.Optimizer) -> None:
    if not isinstance(st, dict) or set(st) != {"state", "param_groups"}:
        raise ValueError(f"--resume: {path}: optimizer: expected {{state, param_groups}}")
    groups, own = st["param_groups"], opt.param_groups
    if not isinstance(groups, list) or len(groups) != len(own) or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"--resume: {path}: optimizer.param_groups: expected {len(own)} group(s)")
    params = {}
    for i, (g, o) in enumerate(zip(groups, own)):
        ids = g.get("params")
        if not isinstance(ids, list) or len(ids) != len(o["params"]) or set(g) != set(o):
            raise ValueError(f"--resume: {path}: optimizer.param_groups[{i}] does not match this run's parameters")
        for k, v in g.items():
            ref = o[k]
            if k == "params":
                continue
            num = _num(v) and _num(ref)
            if type(v) is not type(ref) and not num:
                raise TypeError(f"--resume: {path}: optimizer.param_groups[{i}].{k}: expected {type(ref).__name__}")
            if num and not math.isfinite(v):
                raise ValueError(f"--resume: {path}: optimizer.param_groups[{i}].{k}: expected a finite number")
        params.update(zip(ids, o["params"]))
    state = st["state"]
    if not isinstance(state, dict) or not set(state) <= set(params):
        raise ValueError(f"--resume: {path}: optimizer.state: keys do not match the optimizer's parameters")
    for pid, entry in state.items():
        p = params[pid]
        if not isinstance(entry, dict):
            raise TypeError(f"--resume: {path}: optimizer.state[{pid}]: expected a dict")
        for k, v in entry.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"--resume: {path}: optimizer.state[{pid}].{k}: expected a tensor")
            if k == "step":
                ok = v.numel() == 1 and v.is_floating_point() and bool(torch.isfinite(v).all()) and float(v) >= 0
            else:
                ok = v.shape == p.shape and v.dtype == p.dtype and bool(torch.isfinite(v).all())
            if not ok:
                raise ValueError(
                    f"--resume: {path}: optimizer.state[{pid}].{k}: expected {'a step count' if k == 'step' else ''}"
                    f"{'' if k == 'step' else f'finite {p.dtype} {list(p.shape)}'}, got {v.dtype} {list(v.shape)}"
                )


def _check_scheduler(path: str, st, sched) -> None:
    ref = sched.state_dict()
    if not isinstance(st, dict) or set(st) != set(ref):
        raise ValueError(f"--resume: {path}: scheduler: expected the keys {sorted(ref)}")
    for k, v in st.items():
        r = ref[k]
        if _num(r):
            ok = _num(v) and math.isfinite(v)
        elif isinstance(r, list):
            ok = isinstance(v, list) and len(v) == len(r)
            ok = ok and all((x is None) if y is None else (_num(x) and math.isfinite(x)) for x, y in zip(v, r))
        else:
            ok = type(v) is type(r)
        if not ok:
            raise ValueError(f"--resume: {path}: scheduler.{k}: expected a value like {r!r}, got {v!r:.60}")


def _plain(v) -> bool:
    """A JSON-like value (what metrics.json holds): None, bool, str, finite-or-inf numbers, lists, str-keyed dicts."""
    if v is None or isinstance(v, (bool, str)):
        return True
    if isinstance(v, Real):
        return not math.isnan(v)
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def load_train_state(path: str, opt, sched) -> Tuple[List[dict], int, dict]:
    """Restore ``opt`` and ``sched`` from ``path``; returns (history, first epoch to run, best)."""
    st = _load(path)
    if not isinstance(st, dict):
        raise TypeError(f"--resume: {path}: expected a dict, got {type(st).__name__}")
    missing = [k for k in KEYS if k not in st]
    if missing:
        raise ValueError(f"--resume: {path}: missing fields {missing}")
    unknown = sorted(set(st) - set(KEYS) - {"train_config", "best"})
    if unknown:
        raise ValueError(f"--resume: {path}: unknown fields {unknown}")
    epoch, history, best = st["epoch"], st["history"], st.get("best", {"epoch": None, "rsum": -math.inf})
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"--resume: {path}: epoch: expected an int >= 0, got {epoch!r:.60}")
    if not isinstance(history, list) or len(history) != epoch + 1 or not all(isinstance(h, dict) for h in history):
        raise ValueError(f"--resume: {path}: history: expected a list of {epoch + 1} per-epoch records")
    if not _plain(history):
        raise ValueError(f"--resume: {path}: history: expected plain JSON-like values (numbers, strings, lists, dicts)")
    be, br = (best.get("epoch"), best.get("rsum")) if isinstance(best, dict) else (0.5, None)
    if not (be is None or (isinstance(be, int) and not isinstance(be, bool) and 1 <= be <= epoch + 1)) or not (
        _num(br) and not math.isnan(br)
    ):
        raise ValueError(f"--resume: {path}: best: expected {{epoch: None or 1..{epoch + 1}, rsum: a number}}")
    if not isinstance(st.get("train_config", {}), dict):
        raise TypeError(f"--resume: {path}: train_config: expected a dict")
    _check_optimizer(path, st["optimizer"], opt)
    _check_scheduler(path, st["scheduler"], sched)
    try:
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"--resume: {path}: does not fit this run's optimizer/scheduler ({one_line(e)})") from e
    return history, epoch + 1, {"epoch": be, "rsum": float(br)}
