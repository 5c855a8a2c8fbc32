"""Worker side: base tensors on a device segment are copy-on-write, per tensor.

A worker maps a device segment read-only where it can (`DeviceSegments.open`): on a GPU a
write into it is an illegal address that poisons the CUDA context, on the host stand-in a
SIGSEGV. Where the driver refuses read-only the write would change the base under every
other worker. Either way a write must be redirected before it reaches the segment; the
arena on the host needs none of this (its MAP_PRIVATE pages are copied by the kernel).

`protect(tensor)` returns the tensor as a `SharedParameter` (or `SharedTensor` for a
buffer): a subclass whose `__torch_function__` sees every torch call on it, on the
aliases it hands out (`.data`, views, slices, `.detach()`) and on their aliases. Before a
call that writes into one of them (an in-place method such as `add_`/`copy_`/`zero_`, an
augmented assignment `+=`, item assignment, `out=`, `torch._foreach_*_`, `nn.init.*_`)
the parameter it belongs to swaps in a private copy of itself (`param.data = clone`) and
the write goes there; the stale alias is re-pointed at that copy. Only touched tensors are
copied. Reads and other calls pass through with torch's own kernels and are not
re-wrapped (activations stay plain tensors).

This covers PEFT's merges without patching it: `Linear.merge` (safe_merge or not) writes
`base_layer.weight.data += delta` (an augmented assignment on an alias of the parameter)
or assigns `.data`, the embedding and conv merges likewise, and unmerge subtracts in place
again; bitsandbytes 4-bit merges build a new `Params4bit` and assign it, never writing into
the packed weights. It does not cover writes that bypass torch's Python dispatch: raw
pointers (`data_ptr()` handed to a custom kernel, Triton, DLPack,
`__cuda_array_interface__`, `.numpy()`), storages (`untyped_storage()`), collectives
writing into a base tensor (`dist.broadcast`, `all_reduce`: keep base tensors out of DDP's
sync, `keep_base_out_of_ddp`), and bitsandbytes' packed 4-bit weights and QuantState,
which are bitsandbytes' own classes and are not wrapped. Such a write faults a read-only
mapping instead of changing the base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch._C import DisableTorchFunctionSubclass

_IN_PLACE_DUNDERS = frozenset(
    {
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__imatmul__",
    }
)
# Trailing-underscore calls that change metadata only, or replace the storage (nothing is
# written into the old one): no private copy needed.
_NOT_WRITES = frozenset({"requires_grad_", "detach_", "share_memory_", "set_", "retain_grad"})

_HOME = "_basehold_home"  # on a root: the segment's storage pointer
_OFFSET = "_basehold_offset"  # on a root: its byte offset in the segment when protected
_ROOT = "_basehold_root"  # on an alias: the root it is a view of


def _writes(name: str) -> bool:
    if name in _IN_PLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES


def _storage(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: no single storage
        return 0


def _root_of(tensor: torch.Tensor) -> torch.Tensor:
    root: torch.Tensor | None = getattr(tensor, _ROOT, None)
    return tensor if root is None else root


def _on_segment(tensor: torch.Tensor) -> bool:
    home = getattr(_root_of(tensor), _HOME, 0)
    return bool(home) and _storage(tensor) == home


def _private(tensor: torch.Tensor) -> torch.Tensor:
    """Give `tensor`'s root a private copy (once) and return `tensor` pointing into it."""
    root = _root_of(tensor)
    if _storage(root) == getattr(root, _HOME):
        root.data = root.clone()  # the parameter object stays: modules, optimizers keep it
    if tensor is root:
        return root
    byte_offset = tensor.storage_offset() * tensor.element_size() - getattr(root, _OFFSET)
    moved = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        moved.set_(
            root.untyped_storage(),
            byte_offset // tensor.element_size(),
            tensor.size(),
            tensor.stride(),
        )
    try:
        # The caller's alias object now points into the copy too (`w = p.data; w.add_(1)`
        # then reads what it wrote).
        torch.utils.swap_tensors(tensor, moved)
    except RuntimeError:
        return moved  # still stale for reads, but every write through it is redirected
    return tensor


def _targets(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    found: list[Any] = []
    if _writes(name) and (args or kwargs):
        # The written tensor comes first; `nn.init.*_` pass it by keyword (`tensor=`).
        first = args[0] if args else next(iter(kwargs.values()))
        found += list(first) if isinstance(first, list | tuple) else [first]
    out = kwargs.get("out")
    if out is not None:
        found += list(out) if isinstance(out, list | tuple) else [out]
    return found


def _replace(value: Any, moved: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return moved.get(id(value), value)
    if isinstance(value, list | tuple):
        return type(value)(moved.get(id(v), v) for v in value)
    return value


def _redirect(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    moved = {
        id(t): _private(t)
        for t in _targets(name, args, kwargs)
        if isinstance(t, _SHARED) and _on_segment(t)
    }
    if not moved:
        return args, kwargs
    return (
        tuple(_replace(a, moved) for a in args),
        {k: _replace(v, moved) for k, v in kwargs.items()},
    )


def _alias(value: Any, root: torch.Tensor) -> Any:
    """Results still on the segment (views, `.data`) are wrapped too: a write through them
    must be redirected like one through the parameter."""
    if isinstance(value, torch.Tensor) and not isinstance(value, _SHARED):
        if _storage(value) == getattr(root, _HOME, 0):
            wrapped = value.as_subclass(SharedTensor)
            setattr(wrapped, _ROOT, root)
            return wrapped
        return value
    if isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_alias(v, root) for v in value)
    return value


def _torch_function(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
) -> Any:
    kwargs = kwargs or {}
    name = getattr(func, "__name__", "")
    with DisableTorchFunctionSubclass():
        if _writes(name) or "out" in kwargs:
            args, kwargs = _redirect(name, args, kwargs)
        result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor | list | tuple):
            return result
        source = next((a for a in args if isinstance(a, _SHARED)), None)
        return result if source is None else _alias(result, _root_of(source))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    with DisableTorchFunctionSubclass():
        return tensor.as_subclass(torch.Tensor)


class _CopyOnWrite:
    """What both kinds of base tensor share: every torch call goes through
    `_torch_function`; saved and deep-copied as the plain class `_plain_copy` makes
    (`torch.load(weights_only=True)` knows no other class; a copy is private anyway)."""

    def _plain_copy(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._plain_copy(_plain(self)).__reduce_ex__(protocol)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        copied = self._plain_copy(_plain(self).clone())  # type: ignore[arg-type]
        memo[id(self)] = copied
        return copied

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Sequence[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _torch_function(func, args, kwargs)


class SharedParameter(_CopyOnWrite, nn.Parameter):
    """A base parameter on a device segment: copy-on-write (see the module's docstring),
    saved and deep-copied as a plain `nn.Parameter`."""

    def _plain_copy(self, data: torch.Tensor) -> torch.Tensor:
        return nn.Parameter(data, self.requires_grad)


class SharedTensor(_CopyOnWrite, torch.Tensor):
    """A base buffer on a device segment, or an alias of a base tensor still on it; saved
    and deep-copied as a plain tensor."""

    def _plain_copy(self, data: torch.Tensor) -> torch.Tensor:
        return data


_SHARED = (SharedParameter, SharedTensor)


def _mark(tensor: torch.Tensor) -> None:
    with DisableTorchFunctionSubclass():
        setattr(tensor, _HOME, _storage(tensor))
        setattr(tensor, _OFFSET, tensor.storage_offset() * tensor.element_size())


def protect_parameter(tensor: torch.Tensor) -> SharedParameter:
    """A frozen parameter over `tensor` (a view of a device segment) that copies itself
    before the first write."""
    parameter = SharedParameter(tensor, requires_grad=False)
    _mark(parameter)
    return parameter


def protect_buffer(tensor: torch.Tensor) -> SharedTensor:
    """`tensor` (a view of a device segment) as a buffer that copies itself before the
    first write."""
    buffer = tensor.as_subclass(SharedTensor)
    _mark(buffer)
    return buffer


def on_segment(tensor: torch.Tensor) -> bool:
    """Whether a protected tensor still reads the segment (False once written: private)."""
    with DisableTorchFunctionSubclass():
        return isinstance(tensor, _SHARED) and _on_segment(tensor)
