"""A pickle reader for checkpoints that builds data and never runs the file's code.

``torch.load(weights_only=True)`` refuses real Lightning checkpoints: besides the weights they hold callback
state, ``hyper_parameters`` (omegaconf ``DictConfig``, ``argparse.Namespace``), numpy scalars and classes of
``pytorch_lightning``. This module is the fallback ``torch.load`` is given as ``pickle_module`` (so torch's
own zip / legacy readers still do the storage work). Every global the pickle names goes through
:meth:`RestrictedUnpickler.find_class`, which

- returns the objects torch's ``weights_only`` unpickler allows (tensor/storage rebuild functions, storage and
  tensor types, dtypes, ``torch.Size``, ``torch.device``, ``collections.OrderedDict``) plus plain builtin data
  types, ``datetime`` types and numpy's array / scalar / dtype reconstructors;
- turns classes of known data-only packages (:data:`INERT_MODULES`) into :class:`InertObject` subclasses
  whose construction, ``__setstate__``, item and list assignment only *record* their arguments: nothing is
  imported and nothing of the original class runs;
- refuses everything else (``os``, ``subprocess``, ``builtins.eval``, ``functools.partial``, unknown
  modules ...) with :class:`UnsafeCheckpointError`.

Before a pickle is read its opcodes are scanned (``pickletools.genops``, which only parses), so every refused
``GLOBAL`` is named at once before any object is built, and copyreg extension codes (which could resolve a
global without ``find_class``) are refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import datetime
import io
import pickle
import pickletools
from collections.abc import Callable
from functools import lru_cache
from typing import IO, Any, ClassVar

import torch

# Packages whose classes carry only data in checkpoints (training state, configs); their classes become
# inert placeholders. ``__main__`` covers the callbacks CompVis' ``main.py`` defines in the training script.
INERT_MODULES: tuple[str, ...] = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "torchmetrics",
    "omegaconf",
    "ldm",
    "taming",
    "typing",
    "pathlib",
    "enum",
    "__main__",
)
INERT_GLOBALS: frozenset[str] = frozenset({"argparse.Namespace"})

_EXTENSION_OPS = frozenset({"EXT1", "EXT2", "EXT4"})


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names globals that could run code; nothing from it was loaded."""

    def __init__(self, refused: tuple[str, ...] | list[str], path: str | None = None, *, reason: str = ""):
        self.refused = tuple(dict.fromkeys(refused))
        self.path = path
        self.reason = reason
        where = f"{path}" if path else "the checkpoint"
        names = ", ".join(self.refused)
        why = (
            f"{names}: {reason}"
            if reason
            else (
                f"its pickle references {names}, which could run code while unpickling, and is neither a "
                "tensor type, plain data nor a class of a known data-only package"
            )
        )
        super().__init__(
            f"refused to load {where}: {why}. The file was not loaded and nothing in it was executed. "
            "Allowed: tensors, plain Python data, numpy arrays/scalars, and inert placeholders for classes "
            f"of {', '.join(INERT_MODULES)}, argparse.Namespace. If you trust the file, re-save its weights "
            "as .safetensors."
        )


class InertObject:
    """Stands in for an instance of a class that is never imported: it only records how it was built.

    ``inert_class`` is the original ``module.qualname``; ``args``/``kwargs`` what the pickle constructed it
    with, ``state`` what ``__setstate__`` received, ``dict_items``/``list_items`` what was stored into it.
    """

    inert_class: ClassVar[str] = "?"
    __slots__ = ("args", "dict_items", "kwargs", "list_items", "state")

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.dict_items = {}
        obj.list_items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # construction only records (in __new__)
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, item: Any) -> None:
        self.list_items.append(item)

    def extend(self, items: Any) -> None:
        self.list_items.extend(items)

    def __reduce__(self) -> Any:
        raise TypeError(f"an inert placeholder of {self.inert_class} cannot be pickled again")

    def __repr__(self) -> str:
        return f"<inert {self.inert_class}>"


def inert_class(qualified_name: str) -> type[InertObject]:
    """A fresh placeholder class for ``module.qualname`` (never the real class)."""
    short = qualified_name.rsplit(".", 1)[-1]
    cls = type(short, (InertObject,), {"__slots__": (), "inert_class": qualified_name})
    cls.__module__ = __name__
    return cls


def is_inert(qualified_name: str) -> bool:
    module = qualified_name.rsplit(".", 1)[0]
    return qualified_name in INERT_GLOBALS or any(
        module == m or module.startswith(m + ".") for m in INERT_MODULES
    )


# -- what may be built ---------------------------------------------------------------------------------
def _latin1_encode(text: object, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for ``bytes`` (latin-1 only)."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            ("_codecs.encode",), reason="_codecs.encode is only allowed for latin-1 text"
        )
    return text.encode("latin1")


def _type_of_singleton(obj: object) -> type:
    """``builtins.type`` as pickle uses it for ``type(None)`` and friends; nothing else."""
    if obj is None or obj is Ellipsis or obj is NotImplemented:
        return type(obj)
    raise UnsafeCheckpointError(("builtins.type",), reason="builtins.type may only name type(None)")


def _check_constructible(cls: object, name: str) -> None:
    if not (isinstance(cls, type) and (issubclass(cls, InertObject) or cls in _SAFE_BUILTIN_TYPES)):
        raise UnsafeCheckpointError((name,), reason=f"{name} may only build placeholders or builtin data")


def _copyreg_reconstructor(cls: type, base: type, state: object) -> object:
    """``copyreg._reconstructor`` (pickle protocols 0/1), restricted to placeholders and builtin data."""
    _check_constructible(cls, "copyreg._reconstructor")
    if base is not object and base not in _SAFE_BUILTIN_TYPES:
        raise UnsafeCheckpointError(("copyreg._reconstructor",), reason="unexpected base class")
    if issubclass(cls, InertObject):
        return cls(state) if state is not None else cls()
    return cls() if state is None else cls(state)  # type: ignore[call-arg]


def _copyreg_newobj(cls: type, *args: object) -> object:
    _check_constructible(cls, "copyreg.__newobj__")
    return cls.__new__(cls, *args)


def _copyreg_newobj_ex(cls: type, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    _check_constructible(cls, "copyreg.__newobj_ex__")
    return cls.__new__(cls, *args, **kwargs)


_SAFE_BUILTIN_TYPES: frozenset[type] = frozenset(
    {
        dict,
        list,
        tuple,
        set,
        frozenset,
        bytearray,
        bytes,
        complex,
        slice,
        range,
        int,
        float,
        bool,
        str,
        object,
    }
)


def _tensor_rebuild_functions() -> set[Callable[..., Any]]:
    names = (
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_nested_tensor",
        "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
    )
    return {getattr(torch._utils, n) for n in names if hasattr(torch._utils, n)}


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: type, args: tuple[Any, ...], state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` for plain tensors/parameters; Python attributes are dropped."""
    if func not in _tensor_rebuild_functions() or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeCheckpointError(
            ("torch._tensor._rebuild_from_type_v2",),
            reason="_rebuild_from_type_v2 may only rebuild plain tensors with torch's rebuild functions",
        )
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, None)  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def _torch_globals() -> dict[str, Any]:
    """Mirror of ``torch._weights_only_unpickler._get_allowed_globals`` (torch 2.x)."""
    out: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.device": torch.device,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.torch_version.TorchVersion": str,
    }
    for value in vars(torch).values():
        if isinstance(value, torch.dtype | torch.qscheme):
            out[str(value)] = value
    for tt in torch._tensor_classes:  # type: ignore[attr-defined]
        out[f"{tt.__module__}.{tt.__name__}"] = tt
    for ts in torch._storage_classes:  # type: ignore[attr-defined]
        if ts in (torch.storage.TypedStorage, torch.storage.UntypedStorage):
            out[f"{ts.__module__}.{ts.__name__}"] = ts
        else:
            out[f"{ts.__module__}.{ts.__name__}"] = torch.serialization.StorageType(ts.__name__)
    for f in _tensor_rebuild_functions():
        out[f"torch._utils.{f.__name__}"] = f
    return out


@lru_cache(maxsize=1)
def _data_globals() -> dict[str, Any]:
    out: dict[str, Any] = {f"builtins.{t.__name__}": t for t in _SAFE_BUILTIN_TYPES}
    out["builtins.type"] = _type_of_singleton
    out["_codecs.encode"] = _latin1_encode
    out["copyreg._reconstructor"] = _copyreg_reconstructor
    out["copyreg.__newobj__"] = _copyreg_newobj
    out["copyreg.__newobj_ex__"] = _copyreg_newobj_ex
    for t in (datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone):
        out[f"datetime.{t.__name__}"] = t
    return out


@lru_cache(maxsize=1)
def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but a checkpoint must not need it to be refused cleanly
        return {}
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]

    def reconstruct(subtype: type, shape: Any, dtype: Any) -> Any:
        if subtype is not np.ndarray:
            raise UnsafeCheckpointError(
                ("numpy._core.multiarray._reconstruct",), reason="only plain ndarrays"
            )
        return multiarray._reconstruct(subtype, shape, dtype)

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> Any:
        return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)

    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        out[f"{mod}.multiarray._reconstruct"] = reconstruct
        out[f"{mod}.multiarray.scalar"] = multiarray.scalar
        out[f"{mod}.numeric._frombuffer"] = frombuffer
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        value = getattr(dtypes, name)
        if isinstance(value, type) and issubclass(value, np.dtype):
            out[f"numpy.dtypes.{name}"] = value
    return out


def resolve_global(module: str, name: str, inert_classes: dict[str, type[InertObject]]) -> Any:
    """What ``module.name`` unpickles to, or :class:`UnsafeCheckpointError`. Never imports anything."""
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 pickles (protocol < 3)
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module == "torch.tensor":  # renamed module torch itself maps (pytorch#51633)
        module = "torch._tensor"
    full = f"{module}.{name}"
    for table in (_torch_globals(), _data_globals(), _numpy_globals()):
        if full in table:
            return table[full]
    if is_inert(full):
        if full not in inert_classes:
            inert_classes[full] = inert_class(full)
        return inert_classes[full]
    raise UnsafeCheckpointError((full,))


def scan_globals(file: IO[bytes]) -> None:
    """Parse (never execute) one pickle from ``file``'s position; refuse bad globals and extension codes.

    The position is restored afterwards. Globals pushed by ``STACK_GLOBAL`` are checked by ``find_class``.
    """
    start = file.tell()
    refused: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(file):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
                try:
                    resolve_global(module, name, {})
                except UnsafeCheckpointError as e:
                    refused.extend(e.refused)
            elif op.name in _EXTENSION_OPS:
                raise UnsafeCheckpointError(
                    (f"copyreg extension code {arg}",), reason="it uses copyreg extension codes"
                )
    except (ValueError, EOFError) as e:
        if isinstance(e, UnsafeCheckpointError):
            raise
        raise pickle.UnpicklingError(f"the pickle is malformed: {e}") from None
    finally:
        file.seek(start)
    if refused:
        raise UnsafeCheckpointError(refused)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are the allowlist above; see the module docstring."""

    def __init__(self, file: IO[bytes], *args: Any, **kwargs: Any) -> None:
        scan_globals(file)
        super().__init__(file, *args, **kwargs)
        self.inert_classes: dict[str, type[InertObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, self.inert_classes)


class RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs (``Unpickler``, ``load``), recording placeholders."""

    __name__ = "ldm_sdk.checkpoints.unpickler"

    def __init__(self) -> None:
        self.inert_classes: dict[str, type[InertObject]] = {}
        shared = self.inert_classes

        class Unpickler(RestrictedUnpickler):
            def __init__(self, file: IO[bytes], *args: Any, **kwargs: Any) -> None:
                super().__init__(file, *args, **kwargs)
                self.inert_classes = shared

        self.Unpickler = Unpickler

    def load(self, file: IO[bytes], **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` (a plain pickle, no torch storages) under the same rules."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


__all__ = [
    "INERT_MODULES",
    "InertObject",
    "RestrictedPickleModule",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "resolve_global",
    "restricted_loads",
    "scan_globals",
]
