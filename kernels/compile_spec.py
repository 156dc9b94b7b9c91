"""The ahead-of-time compile spec shared by every kernel package's ``aot_specs()``."""

from __future__ import annotations

from typing import Any, NamedTuple


class KernelSpec(NamedTuple):
    """One ahead-of-time compile: a ``@triton.jit`` function at one config and set of constexprs."""

    name: str  # e.g. "gather_act_fwd[swiglu=True,cfg0,bf16]"
    fn: Any  # the bare JITFunction (an Autotuner's ``.fn``)
    signature: dict[str, str]  # runtime argument → Triton type ("*bf16", "i32", "fp32")
    constexprs: dict[str, Any]  # every constexpr, tile sizes included
    options: dict[str, Any]  # num_warps, num_stages
    must_fit: bool = True  # False: the autotuner skips it when it does not fit shared memory
