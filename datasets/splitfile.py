"""Safe reading of the official split files (pickled Python lists of tuples).

The files are written with ``torch.save`` (zip or legacy format) or plain ``pickle``.
By default they are read without executing arbitrary code: torch's weights-only loader
(or, for plain pickles, an unpickler with the same allow-list)
accepting the builtin containers and scalars plus numpy arrays and numpy scalars,
which some split files carry for boxes. Anything else is refused with an error that
names the file and the ``--allow_unsafe_pickle`` opt-in.
"""
import codecs
import functools
import io
import pickle
import re
import zipfile

import numpy as np
import torch

UNSAFE_FLAG = "--allow_unsafe_pickle"

_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-1.6) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def torch_format(path) -> str:
    """What kind of file torch.load is about to read, told from its bytes without unpickling anything (shared
    with the weights reader, models.weights): 'zip' (torch.save since 1.6, TorchScript), 'truncated zip' (a
    zip whose end is missing: a write or copy that did not finish), 'legacy' (torch < 1.6), 'empty', or
    'other' (a plain pickle, text, ...)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "zip" if zipfile.is_zipfile(path) else "truncated zip"
    return "legacy" if head == _LEGACY_MAGIC else "other"


def _numpy_globals():
    """(object, name in the pickle) pairs numpy needs to rebuild arrays and scalars.

    Pickles written by numpy 1.x name ``numpy.core.multiarray``, numpy 2.x ``numpy._core.multiarray``.
    """
    from numpy._core import multiarray

    pairs = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs.append((multiarray._reconstruct, f"{module}._reconstruct"))
        pairs.append((multiarray.scalar, f"{module}.scalar"))
    pairs.append((np.ndarray, "numpy.ndarray"))
    pairs.append((np.dtype, "numpy.dtype"))
    for code in "?bhilqBHILQefdgSU":
        cls = type(np.dtype(code))
        pairs.append((cls, f"{cls.__module__}.{cls.__name__}"))
    return pairs


class Refused(pickle.UnpicklingError):
    """The restricted unpickler met a global outside its allow-list (nothing was called)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Pickle reader that resolves only the numpy globals above and the bytes rebuilder of protocol 2."""

    def find_class(self, module, name):
        allowed = _allowed_globals()
        if f"{module}.{name}" not in allowed:
            raise Refused(f"global {module}.{name}")
        return allowed[f"{module}.{name}"]


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict:
    """Name in the pickle -> object, built once: the numpy globals and protocol 2's (torch.save's) bytes rebuilder."""
    return {**{qualname: obj for obj, qualname in _numpy_globals()}, "_codecs.encode": codecs.encode}


def _storage_free_pickle(path):
    """The pickle of a torch zip archive that holds no tensor storages, else None. Such a file (every split file
    torch.save wrote from plain Python lists) unpickles with the C unpickler under the allow-list above: 4x
    faster than torch's pure-Python weights-only unpickler on a 144000-expression synthetic split, with fewer
    globals allowed."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        storages = [n for n in names if "/data/" in n and not n.endswith(".pkl")]
        if len(pickles) != 1 or storages:
            return None
        return archive.read(pickles[0])


def load_pickled_list(path: str, allow_unsafe: bool = False) -> list:
    """Read one split file and return its list. Raises FileNotFoundError or ValueError."""
    kind = torch_format(path)
    if kind == "empty":
        raise ValueError(f"split file {path} is empty (0 bytes). Re-download it, or regenerate it (synthetic set: "
                         "python -m datasets.synthetic).")
    try:
        if kind != "other" and allow_unsafe:
            data = torch.load(path, map_location="cpu", weights_only=False)
        elif kind == "zip" and (raw := _storage_free_pickle(path)) is not None:
            data = _RestrictedUnpickler(io.BytesIO(raw)).load()
        elif kind != "other":
            with torch.serialization.safe_globals(_numpy_globals()):
                data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                data = pickle.load(f) if allow_unsafe else _RestrictedUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is reported with the file name
        # A refusal, told by its type: torch's weights-only unpickler raises UnpicklingError for an object
        # outside its allow-list (inside a torch file, the pickle itself is torch's), ours raises Refused.
        if isinstance(e, Refused) or (kind != "other" and isinstance(e, pickle.UnpicklingError)):
            found = re.search(r"GLOBAL (\S+)|global (\S+)", str(e))
            raise ValueError(
                f"split file {path} needs more than plain Python types and numpy arrays to load"
                f"{f' ({found.group(1) or found.group(2)})' if found else ''}; it was not loaded. If you trust its "
                f"source, pass {UNSAFE_FLAG} to unpickle it without restrictions (this can execute arbitrary "
                f"code).") from None
        detail = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else "no details"
        raise ValueError(
            f"split file {path} is not a readable pickle/torch file ({type(e).__name__}: {detail}). "
            f"Re-download it, or regenerate it (synthetic set: python -m datasets.synthetic).") from None
    if not isinstance(data, list):
        raise ValueError(
            f"split file {path} holds a {type(data).__name__}, expected a list of sample tuples. "
            f"Check --split_root and --dataset.")
    return data
