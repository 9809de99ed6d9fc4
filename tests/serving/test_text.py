"""Incremental detokenization and stop sequences (serving/text.py)."""

from __future__ import annotations

import pytest

from serving.text import TextTracker
from testkit.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("llama")


def feed(tracker: TextTracker, tokenizer, text: str) -> list[str]:
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(tracker.add(token))
        if tracker.stopped:
            break
    return deltas


def test_deltas_join_to_the_full_decode(tokenizer):
    tracker = TextTracker(tokenizer)
    deltas = feed(tracker, tokenizer, "the movie was very good")
    ids = tokenizer("the movie was very good", add_special_tokens=False)["input_ids"]
    assert "".join(deltas) + tracker.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    assert all(deltas)  # every word shows as soon as it arrives


def test_stop_sequence_across_tokens_cuts_before_it(tokenizer):
    tracker = TextTracker(tokenizer, stop=("very good",))
    deltas = feed(tracker, tokenizer, "the movie was very good and more")
    assert tracker.stopped
    assert "".join(deltas) == "the movie was "
    assert tracker.finish() == ""


def test_text_that_may_start_a_stop_is_held_back_then_released(tokenizer):
    tracker = TextTracker(tokenizer, stop=("very good",))
    deltas = feed(tracker, tokenizer, "it was very")
    assert "".join(deltas) == "it was "  # "very" could be the start of "very good"
    assert tracker.add(tokenizer.convert_tokens_to_ids("bad")) == "very bad"
    assert not tracker.stopped


def test_earliest_of_several_stops_wins(tokenizer):
    tracker = TextTracker(tokenizer, stop=("good", "was"))
    deltas = feed(tracker, tokenizer, "it was good")
    assert "".join(deltas) == "it "
