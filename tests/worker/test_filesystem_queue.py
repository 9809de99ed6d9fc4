"""The embedded queue's transport (worker/filesystem_queue.py) through real kombu connections on a folder:
a message being written is invisible, an unreadable one is dropped without stopping the consumer, and
concurrent producers and consumers deliver every message exactly once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from worker.celery_app import FILESYSTEM_TRANSPORT
from worker.filesystem_queue import STAGING_SUFFIX, message_queue

QUEUE = "cpu"


def connect(root: Path) -> Connection:
    messages, claimed = root / "messages", root / "claimed"
    for folder in (messages, claimed, root / "control"):
        folder.mkdir(parents=True, exist_ok=True)
    return Connection(
        "filesystem://localhost/",
        transport=FILESYSTEM_TRANSPORT,
        transport_options={
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(root / "control"),
            "claimed_folder": str(claimed),
        },
    )


def queue_on(connection: Connection):  # noqa: ANN201 - kombu SimpleQueue
    return connection.SimpleQueue(Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE))


def test_message_names_are_read_as_kombu_reads_them():
    assert message_queue("000000000001234_ab-cd.cpu.msg") == "cpu"
    assert message_queue("000000000001234_ab-cd.gpu.msg") == "gpu"
    assert message_queue("000000000001234_ab-cd.cpu.msg" + STAGING_SUFFIX) == ""
    assert message_queue("claimed") == ""


def test_a_message_still_being_written_is_neither_seen_nor_consumed(tmp_path):
    with connect(tmp_path) as connection:
        queue = queue_on(connection)
        staged = tmp_path / "messages" / f"000000000000001_x.{QUEUE}.msg{STAGING_SUFFIX}"
        staged.write_bytes(b'{"body": "half')
        assert queue.qsize() == 0
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.3)
        assert staged.exists()

        queue.put({"job": "a"})
        assert queue.qsize() == 1
        assert list((tmp_path / "messages").glob("*.part")) == [staged]  # put left no staging file of its own


def test_an_unreadable_message_is_dropped_and_the_next_one_delivered(tmp_path, caplog):
    with connect(tmp_path) as connection:
        queue = queue_on(connection)
        # Sorted before anything `put` writes: the consumer meets the broken ones first.
        (tmp_path / "messages" / f"000000000000001_empty.{QUEUE}.msg").write_bytes(b"")
        (tmp_path / "messages" / f"000000000000002_torn.{QUEUE}.msg").write_bytes(b'{"body": "eyJq')
        (tmp_path / "messages" / f"000000000000003_binary.{QUEUE}.msg").write_bytes(b"\xff\xfe\x00")
        queue.put({"job": "a"})
        message = queue.get(timeout=2)
        assert message.payload == {"job": "a"}
        message.ack()
        assert queue.qsize() == 0
        assert list((tmp_path / "messages").iterdir()) == []
        assert list((tmp_path / "claimed").iterdir()) == []
    assert sum("dropped unreadable message" in r.getMessage() for r in caplog.records) == 3


def test_concurrent_producers_and_consumers_deliver_every_message_once(tmp_path):
    per_producer, producers, consumers = 150, 2, 3
    received: list[int] = []
    lock = threading.Lock()
    done_producing = threading.Event()

    def produce(offset: int) -> None:
        with connect(tmp_path) as connection:
            queue = queue_on(connection)
            for n in range(per_producer):
                queue.put({"n": offset + n})

    def consume() -> None:
        with connect(tmp_path) as connection:
            queue = queue_on(connection)
            while True:
                try:
                    message = queue.get(timeout=0.2)
                except queue.Empty:
                    if done_producing.is_set():
                        return
                    continue
                with lock:
                    received.append(message.payload["n"])
                message.ack()

    consumer_threads = [threading.Thread(target=consume) for _ in range(consumers)]
    producer_threads = [threading.Thread(target=produce, args=(i * per_producer,)) for i in range(producers)]
    for thread in consumer_threads + producer_threads:
        thread.start()
    for thread in producer_threads:
        thread.join()
    done_producing.set()
    for thread in consumer_threads:
        thread.join(timeout=30)

    assert sorted(received) == list(range(per_producer * producers))
