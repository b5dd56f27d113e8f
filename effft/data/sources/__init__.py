"""Data adapters by name: each module turns a user's files into a `Source` (see `_common`).

`ADAPTERS` maps an adapter name to its module's import path; `adapter(name)` imports it. The
import is deferred so that an adapter's optional dependencies (pydicom for `dicom`,
scikit-image for `face`) matter only when that adapter is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import EffftError

ADAPTERS: dict[str, str] = {
    "folder": "effft.data.sources.folder",
    "csv": "effft.data.sources.table",
    "medmnist": "effft.data.sources.medmnist",
    "dicom": "effft.data.sources.dicom",
    "face": "effft.data.sources.face",
}
# the pip extra that brings an adapter's optional dependencies
EXTRAS: dict[str, str] = {"dicom": "dicom", "face": "face"}


def adapter(name: str) -> ModuleType:
    """The adapter module called `name` (it has `Options` and `load`)."""
    if name not in ADAPTERS:
        raise EffftError(f"unknown data adapter {name!r}: choose one of {sorted(ADAPTERS)}")
    try:
        return importlib.import_module(ADAPTERS[name])
    except ModuleNotFoundError as e:
        if name in EXTRAS and not (e.name or "").startswith("effft"):
            raise EffftError(f"the {name} adapter needs {e.name}: install it with "
                             f"pip install 'effft[{EXTRAS[name]}]'") from e
        raise
