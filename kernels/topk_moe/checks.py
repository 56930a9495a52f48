"""Input checks shared by every backend.

They look only at `.shape` and `.dtype`, so they work on NumPy and CuPy arrays
alike. Each message names the argument, what was expected and what came, as
the contract asks. Checks that must read values (finiteness, index ranges) are
done by the backend, on the device that holds the data.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import numpy as np

from .types import ACTIVATIONS, TOP_K_CHOICES


def shape_of(a: Any) -> tuple:
    return tuple(getattr(a, "shape", np.shape(a)))


def check_rank(name: str, a: Any, ndim: int, letters: str) -> tuple:
    """Check that `a` has `ndim` axes; `letters` names them, e.g. "(T, D)"."""
    shape = shape_of(a)
    if len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array of shape {letters}, got shape {shape}")
    return shape


def check_dim(name: str, axis_name: str, got: int, expected: int, source: str) -> None:
    """Check one axis length against the width it must match."""
    if got != expected:
        raise ValueError(
            f"{name}: expected {axis_name} = {expected} (to match {source}), got {got}"
        )


def check_shape(name: str, a: Any, expected: Sequence[int], letters: str) -> None:
    shape = check_rank(name, a, len(expected), letters)
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {letters} = {tuple(expected)}, got {shape}")


def check_k(k: Any, n_experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) not in TOP_K_CHOICES:
        raise ValueError(f"k: expected 1 or 2, got {k!r}")
    if k > n_experts:
        raise ValueError(f"k: expected at most the number of experts E = {n_experts}, got {k}")
    return int(k)


def check_activation(activation: Any) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_gate(activation: str, w3: Any) -> None:
    """w3 is required exactly when the activation is swiglu."""
    if activation == "swiglu" and w3 is None:
        raise ValueError("w3: expected the gate matrix for activation 'swiglu', got None")
    if activation != "swiglu" and w3 is not None:
        raise ValueError(
            f"w3: expected None for activation {activation!r} (only 'swiglu' uses w3), "
            f"got an array of shape {shape_of(w3)}"
        )


def check_capacity(capacity: Any) -> Optional[int]:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral):
        raise TypeError(f"capacity: expected None or a non-negative integer, got {capacity!r}")
    if capacity < 0:
        raise ValueError(f"capacity: expected None or a non-negative integer, got {capacity}")
    return int(capacity)


def check_n_experts(n_experts: Any) -> int:
    if isinstance(n_experts, bool) or not isinstance(n_experts, numbers.Integral):
        raise TypeError(f"n_experts: expected a positive integer, got {n_experts!r}")
    if n_experts <= 0:
        raise ValueError(f"n_experts: expected a positive integer, got {n_experts}")
    return int(n_experts)


def check_float_dtype(name: str, a: Any, allowed: Optional[Sequence[np.dtype]], backend: str) -> np.dtype:
    """A float dtype the backend can take; `allowed=None` means any float."""
    dtype = np.dtype(getattr(a, "dtype", np.asarray(a).dtype))
    if allowed is None:
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {dtype}")
    elif dtype not in allowed:
        names = ", ".join(str(np.dtype(d)) for d in allowed)
        raise TypeError(f"{name}: backend {backend!r} takes dtypes {names}, got dtype {dtype}")
    return dtype


def check_same_dtype(reference_name: str, reference_dtype: np.dtype, others: dict) -> None:
    """Backends that compute in the input's dtype need every float input in it."""
    for name, a in others.items():
        if a is None:
            continue
        dtype = np.dtype(a.dtype)
        if dtype != reference_dtype:
            raise TypeError(
                f"{name}: expected dtype {reference_dtype} (the dtype of {reference_name}), got dtype {dtype}"
            )


def check_index_dtype(name: str, a: Any) -> None:
    dtype = np.dtype(getattr(a, "dtype", np.asarray(a).dtype))
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array (int32), got dtype {dtype}")
