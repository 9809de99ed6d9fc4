"""The library's typed errors: one root class and a flat table of subclasses.

Every error carries a stable snake_case ``code`` that callers (the HTTP error table, the worker) can map
without parsing messages. A subclass sets its default ``code``; a raise site may pass a more specific one
(``ConfigError("...", code="invalid_rank")``). Add new errors here as one more row of the table.
"""

from __future__ import annotations


class SVFitError(Exception):
    """Root of every error raised on purpose by ``svfit_core``."""

    code: str = "svfit_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(SVFitError, ValueError):
    """Invalid method options: rank ≤ 0, τ outside (0, 1], unknown energy measure, bad target spec.

    Specific codes: ``invalid_rank``, ``invalid_energy``, ``invalid_energy_measure``, ``invalid_band``,
    ``invalid_target_modules``, ``invalid_modules_to_save``, ``no_default_targets``, ``already_injected``,
    ``rank_not_allowed``, ``world_size_mismatch`` (a run joined a process group of another size).
    """

    code = "invalid_config"


class TargetModulesNotFoundError(SVFitError):
    """A target (or a ``modules_to_save`` entry) matched no module of the model.

    ``missing`` holds the entries that matched nothing; ``available`` the linear module names that exist.
    """

    code = "target_modules_not_found"

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        available: list[str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.missing = list(missing or [])
        self.available = list(available or [])


class BaseModelMismatchError(SVFitError):
    """An adapter was loaded onto a base model it was not trained on (module, shape or weight hash differ).

    ``module`` names the first mismatching module when there is one.
    """

    code = "base_model_mismatch"

    def __init__(self, message: str, *, module: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.module = module


class NonFiniteMergeError(SVFitError):
    """Merging an adapter would write NaN or Inf into a base weight; the weight was left untouched."""

    code = "non_finite_merge"

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class AdapterFormatError(SVFitError):
    """An adapter directory is missing files, has an unknown format version or inconsistent tensors."""

    code = "invalid_adapter_format"


class DataError(SVFitError, ValueError):
    """A training or validation file (or example list) cannot be used: bad JSON, unknown or mixed formats,
    no trainable turn, bad labels, empty.

    ``errors`` holds one human-readable message per problem, each prefixed with its line number when it has
    one (``"line 3: invalid JSON: ..."``).
    """

    code = "invalid_training_file"

    def __init__(self, message: str, *, errors: list[str] | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.errors = list(errors or [])


class DeviceMemoryError(SVFitError):
    """Training does not fit in device memory even one example at a time (with gradient checkpointing when
    it was left automatic): found before loading by the pre-flight estimate, or by a step that failed. The
    message names what would fit; ``tokens`` is the length of the example that does not. Not raised for an
    ordinary out-of-memory: the loop retries those with smaller micro-batches."""

    code = "out_of_memory"

    def __init__(self, message: str, *, tokens: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.tokens = tokens


class HostMemoryError(SVFitError):
    """Loading the base model would need more host memory (RAM) than the machine has available. Raised before
    loading starts, where running out would get the worker process killed. ``needed`` and ``available`` are
    bytes."""

    code = "insufficient_host_memory"

    def __init__(self, message: str, *, needed: int, available: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.needed = needed
        self.available = available


class UnsupportedLayerError(SVFitError):
    """A target layer SVFit cannot adapt: a quantized linear (bitsandbytes ``Linear4bit``/``Linear8bitLt``,
    GPTQ, AWQ, HQQ) or any layer whose weight is not a dense floating-point matrix. Its SVD would decompose
    packed bytes, not W.

    ``module`` names the layer and ``layer_type`` its class.
    """

    code = "unsupported_layer"

    def __init__(
        self, message: str, *, module: str | None = None, layer_type: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.module = module
        self.layer_type = layer_type


class InsufficientDevicesError(SVFitError):
    """A data-parallel run asks for more GPUs (one per process, ``world_size``) than this process sees.

    ``requested`` is the run's world size, ``visible`` the CUDA devices this process can use.
    """

    code = "insufficient_devices"

    def __init__(self, message: str, *, requested: int, visible: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.requested = requested
        self.visible = visible


class RankFailedError(SVFitError):
    """Another process of a data-parallel run failed with one of these errors; it carries that error's
    ``code`` and message, and ``rank``, the process that raised it."""

    code = "rank_failed"

    def __init__(self, message: str, *, rank: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.rank = rank
