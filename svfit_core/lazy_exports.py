"""Package-level names that are imported only when first touched (PEP 562), so importing a package does not
import torch for a caller that only wants its torch-free modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports` maps each public name to the module (relative to the
    package) that defines it; a name once imported is kept in `namespace`, the package's globals."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    return __getattr__
