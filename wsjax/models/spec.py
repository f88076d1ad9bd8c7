"""Parameter specs: shape + which initializer, so shapes and counts need no allocation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape (without the layer axis) and its init kind.

    init: "embedding" | "kernel" | "output" (residual-branch output projections) | "ones" | "zeros"
    """

    shape: tuple[int, ...]
    init: str
    fan_in: int = 0
    fan_out: int = 0


def dense_spec(d_in: int, d_out: int, bias: bool, init: str = "kernel") -> dict:
    spec = {"kernel": ParamSpec((d_in, d_out), init, d_in, d_out)}
    if bias:
        spec["bias"] = ParamSpec((d_out,), "zeros")
    return spec


def norm_spec(d: int) -> dict:
    return {"scale": ParamSpec((d,), "ones"), "bias": ParamSpec((d,), "zeros")}
