"""Training state in one safetensors file, without pickle: tensors as safetensors tensors, everything else (ints,
floats, strings, lists, dicts with any keys, tuples) as JSON in the file's metadata, plus a SHA-256 of the
tensor bytes so a flipped bit anywhere in the file is caught on load, not trained on.

Loading runs no code from the file (unlike torch.load with weights_only=False), and a file written here reads
back equal bit for bit: tensors keep dtype and bytes, Python floats keep their repr, tuples stay tuples.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

FORMAT = "diffrl-bench-state-1"
_T, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"  # markers; a dict with a key starting with "$" goes as $items


class CorruptStateFile(Exception):
    """A state file that cannot be read back as written (truncated, bit-flipped, not ours)."""


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], seen: set[int], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        t = obj.detach().to("cpu")
        # safetensors refuses tensors that share memory (a snapshot aliasing the live weights, views): copy those.
        if not t.is_contiguous() or t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {_T: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _flatten(v, tensors, seen, f"{where}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[_flatten(k, tensors, seen, where), _flatten(v, tensors, seen, f"{where}.{k}")]
                         for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {where or 'the top'} in a state file")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _T in obj:
        return tensors[obj[_T]]
    if _TUPLE in obj:
        return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_hashable(_unflatten(k, tensors)): _unflatten(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _unflatten(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors, key=int):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state(state: Any, path: Path) -> None:
    """Write `state` (nested dicts/lists/tuples of tensors and JSON scalars) to `path` (not atomic by itself)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, set(), "")
    meta = {"format": FORMAT, "state": json.dumps(tree, allow_nan=True), "sha256": _digest(tensors)}
    data = serialize(tensors, metadata=meta)
    with open(path, "wb") as f:  # written from Python, so a full disk raises OSError(ENOSPC) naming no Rust type
        f.write(data)


def load_state(path: Path) -> Any:
    """The state saved at `path`; CorruptStateFile (one line, naming what is wrong) if it does not read back."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CorruptStateFile(f"not a {FORMAT} file (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tree = json.loads(meta["state"])
        if _digest(tensors) != meta.get("sha256"):
            raise CorruptStateFile("tensor bytes do not match the checksum written with them")
        return _unflatten(tree, tensors)
    except CorruptStateFile:
        raise
    except (OSError, MemoryError):
        raise
    except Exception as e:  # safetensors' header/size errors, JSON errors, missing keys: all mean a damaged file
        first = (str(e).strip().splitlines() or [""])[0]
        raise CorruptStateFile(f"{type(e).__name__}: {first}"[:300]) from None


def peek(path: Path, key: str) -> Any:
    """state[key] of the file at `path` for a key holding no tensors, read from the header alone (no checksum:
    for looking, not for resuming); CorruptStateFile if the header does not read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        return _unflatten(json.loads(meta["state"])[key], {})
    except (OSError, MemoryError):
        raise
    except Exception as e:
        raise CorruptStateFile(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]) from None
