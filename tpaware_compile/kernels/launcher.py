"""``launch_kernel(kernel, grid, *args, **kwargs)``: ``kernel[grid](*args, **kwargs)`` with Triton's per-launch
work done once per specialization.

Every JIT launch binds the arguments, specializes each (a tensor's dtype and 16-byte alignment; an int's value
1, divisibility by 16, width), builds a cache key and looks the compiled kernel up: 26-41 us of host time for the
wgmma decode kernel on an H100 machine's host, where the compiled kernel's own launcher takes 7-11 us
(bench/probe_launch.py; bench/README.md, "Host time"). Here the first launch of a key goes through Triton, which
compiles or finds the kernel; later launches of that key call the compiled kernel's launcher with the arguments
as given.

The key is finer than Triton's specialization, never coarser: each tensor argument by dtype and whether its
address is a multiple of 16 (tests/test_launcher.py checks that Triton specializes tensors on nothing else), every
other positional argument by value, keyword arguments (constants and launch options) by value, or by identity
for objects such as layouts (the cache keeps them alive, so an identity is never reused). Positional arguments
must be the kernel's leading parameters (Python binds them so) and keyword ones the rest; what the key cannot hold
(a tensor passed by keyword, an unhashable argument), launch hooks, Triton's debug mode and a grid function take
Triton's path. ``TPAWARE_JIT_LAUNCH=1`` takes it for every launch (A/B timing, or to rule this module out).
"""

import os

import torch
from triton import knobs
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime import driver
from triton.runtime.jit import JITFunction

JIT_ONLY = os.environ.get("TPAWARE_JIT_LAUNCH") == "1"
MAX_ENTRIES = 4096  # keys kept (a prefill shape adds one per token count); past this the cache starts over
_BY_VALUE = frozenset((float, bool, str, type(None), torch.dtype))
_TENSOR = torch.Tensor
_compiled = {}  # key -> (compiled kernel, the parameters after the positional ones in order, kernel, keywords)


class _TritonPath(Exception):
    """This launch goes through Triton's JIT launcher."""


def launch_kernel(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``grid`` (a tuple of 1-3 ints) as ``kernel[grid](*args, **kwargs)`` would."""
    if JIT_ONLY or not isinstance(kernel, JITFunction) or callable(grid) or _hooked(kernel):
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    try:
        key = launch_key(kernel, device, args, kwargs)
        entry = _compiled.get(key)
    except (_TritonPath, TypeError):  # TypeError: an unhashable argument
        kernel[grid](*args, **kwargs)
        return
    if entry is None:
        _remember(key, kernel, kernel[grid](*args, **kwargs), bound_tail(kernel, len(args), kwargs), kwargs)
        return
    compiled, tail = entry[:2]
    g = tuple(grid) + (1,) * (3 - len(grid))
    compiled.run(*g, driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                 None, None, *args, *tail)


def launch_key(kernel, device, args, kwargs) -> tuple:
    """The cache key of a launch (module doc). Written for speed: it runs on every launch."""
    tensor = _TENSOR
    pos = tuple([v if type(v) is int else (v.dtype, not v.data_ptr() & 15) if type(v) is tensor else _exact(v, False)
                 for v in args])
    kw = tuple([v if type(v) is int else _exact(v, True) for v in kwargs.values()])
    return id(kernel), device, pos, tuple(kwargs), kw  # id: a kernel's own hash takes a microsecond


def _exact(v, keyword: bool):
    """A non-tensor argument in a key: an int as it is; True, 1.0 and 1 apart (equal in Python, not to Triton); a
    Gluon TMA descriptor by what Triton specializes it on (tests/test_launcher.py); a keyword argument's other
    objects by identity (_remember keeps them alive)."""
    if type(v) in _BY_VALUE:
        return type(v), v
    if isinstance(v, torch.Tensor) and not keyword:  # a subclass (a Parameter)
        return v.dtype, not v.data_ptr() & 15
    if isinstance(v, TensorDescriptor):  # a TMA descriptor: Triton specializes on its dtype, block and layout
        return TensorDescriptor, v.base.dtype, tuple(v.block_shape), v.layout, v.padding
    if keyword and not isinstance(v, torch.Tensor):  # a tensor's address would make every launch a new key
        return "id", id(v)
    raise _TritonPath


def bound_tail(kernel, positional: int, kwargs) -> tuple:
    """The values of the kernel's parameters after the first ``positional`` ones, in its order: keyword arguments,
    else defaults (as Triton's binder fills them; the same for every launch of one key)."""
    params = list(kernel.signature.parameters.items())[positional:]
    return tuple(kwargs[name] if name in kwargs else p.default for name, p in params)


def _remember(key, kernel, compiled, tail, kwargs) -> None:
    """Keep what Triton compiled for ``key``, with its launches' bound tail, and what the key names by identity
    (the kernel, keyword objects), so that no identity in a kept key is reused."""
    if not hasattr(compiled, "packed_metadata"):  # not a compiled kernel (an asynchronous compile's future)
        return
    if len(_compiled) >= MAX_ENTRIES:
        _compiled.clear()
    _compiled[key] = (compiled, tail, kernel, tuple(kwargs.values()))


def _hooked(kernel) -> bool:
    """Launch hooks (a profiler's), pre-run hooks or Triton's debug mode: Triton's path runs them."""
    rt = knobs.runtime
    return _active(rt.launch_enter_hook) or _active(rt.launch_exit_hook) or rt.debug or bool(kernel.pre_run_hooks)


def _active(hook) -> bool:
    """A hook is set: a function, or a chain of them (triton 3.6 keeps an empty chain in place of None)."""
    return hook is not None and bool(getattr(hook, "calls", True))
