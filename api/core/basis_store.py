"""The training library's basis store (svfit_core/bases.py) kept in the service's object store, under
`bases/<key>.safetensors`: every worker and serving process of a deployment (local directory or S3) shares
one copy of each base weight's SVD, computed by whichever job needed it first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.core.storage import Storage

if TYPE_CHECKING:
    import torch

BASES_PREFIX = "bases"


def basis_storage_key(key: str) -> str:
    return f"{BASES_PREFIX}/{key}.safetensors"


class StoredBases:
    """`svfit_core.bases.BasisStore` over a `Storage`. Entries are written once (staged, then committed), so a
    reader never sees half of one; two jobs computing the same entry at once write the same content."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file  # the API process imports this module without torch

        name = basis_storage_key(key)
        if not self.storage.exists(name):
            return None
        return load_file(str(self.storage.path(name)))

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        name = basis_storage_key(key)
        part = self.storage.part_path(name)
        # Serialised here and written with Python's own I/O: a full disk then raises OSError(ENOSPC), which
        # the worker reports as `insufficient_storage` (safetensors' writer raises its own error type).
        try:
            with open(part, "wb") as handle:
                handle.write(save(tensors))
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        self.storage.commit(name)
