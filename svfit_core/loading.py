"""Loading a base model and its tokenizer from a local folder: a Hugging Face folder (``config.json``) or a
folder holding one ``.gguf`` file, as a causal LM or as a sequence classifier, in the dtype and onto the
device a run holds it in (``base_dtype_for`` owns that rule).

Remote code is never trusted. Tokenizers without a pad token pad with EOS, and tokenizers without a chat
template get a plain one, so training and serving render chats the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from svfit_core.errors import ConfigError, SVFitError

# Used when a tokenizer ships no chat template (GPT-2, BERT-style and many base models). Each turn ends
# with EOS so that a model trained on it learns to stop after its answer.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# The dtypes a base may be held in, by the names ``TrainConfig.base_dtype`` and ``config.json`` use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(SVFitError):
    """The base model path is not a loadable model folder."""

    code = "invalid_base_model"


def resolve_model_source(path: str | Path) -> tuple[Path, str | None]:
    """Where to load from: ``(folder, gguf_file)``; ``gguf_file`` is None for a Hugging Face folder.

    Accepts a folder with ``config.json``, a folder with exactly one ``.gguf`` file, or a ``.gguf`` path.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        raise ModelLoadError(f"base model path {str(path)!r} is not a folder")
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadError(f"{str(path)!r} holds several .gguf files ({', '.join(ggufs)}); keep one")
    raise ModelLoadError(f"{str(path)!r} holds neither config.json nor a .gguf file")


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a Hugging Face checkpoint's ``config.json`` declares (``dtype``; ``torch_dtype`` before
    transformers 4.56), or None: it declares none, or the model is a GGUF file (quantised block types)."""
    folder, gguf_file = resolve_model_source(path)
    if gguf_file:
        return None
    declared = json.loads((folder / "config.json").read_text())
    return DTYPES.get(declared.get("dtype") or declared.get("torch_dtype"))


def read_model_config(path: str | Path) -> dict | None:
    """The base's config as a dict, read without loading a weight: ``config.json``, or a GGUF file's metadata
    (its header; needs the ``gguf`` package and an architecture transformers maps). None when a GGUF file's
    cannot be read that way."""
    folder, gguf_file = resolve_model_source(path)
    if not gguf_file:
        return json.loads((folder / "config.json").read_text())
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=False)
    except (ImportError, OSError, ValueError, KeyError):
        return None
    return config.to_dict()


def base_dtype_for(
    path: str | Path, requested: str, device: torch.device, *, bf16: bool | None = None, trains_base: bool = False
) -> torch.dtype:
    """The dtype a training run holds its base model in.

    ``requested`` "float32" | "bfloat16" | "float16" is taken as is. "auto":
    - float32 off CUDA (CPU runs stay fp32 and bit-reproducible), when ``bf16`` is False (the run asked for
      no bf16 compute: fp32 throughout, as before bases had a dtype of their own), and when the method
      trains the base weights themselves (``trains_base``: they need fp32 master weights and Adam moments);
    - on CUDA with ``bf16`` True: bfloat16;
    - on CUDA otherwise, the checkpoint's own dtype: float16 stays float16, bfloat16 stays bfloat16, and a
      float32 checkpoint or one that declares nothing (GGUF) becomes bfloat16 — where the device computes
      bf16 natively; elsewhere float32 (a bf16 checkpoint upcast exactly).
    """
    if requested != "auto":
        return DTYPES[requested]
    if device.type != "cuda" or bf16 is False or trains_base:
        return torch.float32
    if bf16:
        return torch.bfloat16
    stored = checkpoint_dtype(path)
    if stored == torch.float16:
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with a pad token and a chat template guaranteed."""
    folder, gguf_file = resolve_model_source(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {str(path)!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_base_model(
    path: str | Path,
    task: Literal["causal", "classification"],
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a task, in ``dtype``, onto ``device`` (None: the CPU). A
    classification model gets a freshly initialised head of ``num_labels`` outputs (drawn from torch's
    global RNG, so seed first for a reproducible head).

    On an accelerator each weight goes straight to the device in ``dtype``: no copy of the model is held on
    the host. A GGUF file is the exception: transformers dequantises it into a host state dict first.
    """
    folder, gguf_file = resolve_model_source(path)
    tokenizer = load_tokenizer(path)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": False}
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = device
    if gguf_file:
        kwargs.update(_gguf_kwargs(gguf_file))
    if task == "causal":
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elif task == "classification":
        if num_labels is None or num_labels < 1:
            raise ConfigError("a classification model needs num_labels ≥ 1", code="invalid_hyperparameter")
        id2label = id2label or {i: str(i) for i in range(num_labels)}
        model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            num_labels=num_labels,
            id2label=dict(id2label),
            label2id={name: i for i, name in id2label.items()},
            # A base checkpoint that already is a classifier with another label count gets a new head.
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    else:
        raise ConfigError(f"unknown task {task!r} (expected 'causal' or 'classification')",
                          code="invalid_hyperparameter")
    if gguf_file:
        _drop_gguf_quantizer(model)
    # Sequence classifiers find each row's last token through pad_token_id; causal LMs need it for generate.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _gguf_kwargs(gguf_file: str) -> dict:
    """Load a GGUF file as a plain dense model. Recent transformers can keep the weights packed in GGUF
    blocks (special linear modules) when a kernel is installed; training needs ordinary dense weights
    (SVD, LoRA wrappers, gradients), so ask for them to be unpacked."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {"gguf_file": gguf_file}
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    # The unpacked model is an ordinary dense one, but still carries the GGUF quantizer, which makes
    # save_pretrained (full fine-tuning checkpoints, merged exports) refuse to write it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None

