"""The embedded queue's transport: kombu's filesystem transport with message files that appear whole.

kombu's own transport creates a message file under its final name and writes it afterwards, while a
consumer polling the folder may already move and read it: it then reads nothing, and the JSON error
escapes into Celery's consumer loop and stops the worker. It also claims a file by moving it to the
system temp folder, which is a copy, not an atomic step, when that folder is on another filesystem.
Here a producer writes under a staging name and renames the file into place, and a consumer claims a
file by renaming it into a folder beside the queue, so of two consumers exactly one gets each message;
the exchange file that routes messages to queues is replaced whole for the same reason.
A file that still cannot be decoded (a disk that filled mid-write) is dropped with a warning; the
worker's sweep for lost messages re-sends the job it was for.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from functools import cached_property
from queue import Empty

from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

# A file under this suffix is never taken for a message: kombu matches names ending in ".<queue>.msg".
STAGING_SUFFIX = ".part"


def message_queue(name: str) -> str:
    """The queue a message file belongs to, as kombu reads it from the name ("<stamp>_<uuid>.<queue>.msg")."""
    return name.partition(".")[2].removesuffix(".msg") if name.endswith(".msg") else ""


class Channel(filesystem.Channel):
    @cached_property
    def claimed_folder(self) -> str:
        # Created once per channel here, not on every claim: `_get` runs at each poll.
        folder = self.transport_options.get("claimed_folder") or os.path.join(self.data_folder_in, "claimed")
        os.makedirs(folder, exist_ok=True)
        return folder

    def _put(self, queue: str, payload: dict, **kwargs: object) -> None:
        # Zero-padded milliseconds, so that name order is send order even across a change in digit count.
        name = f"{int(time.monotonic() * 1000):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        staging = final + STAGING_SUFFIX
        try:
            with open(staging, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
            os.rename(staging, final)
        except OSError as exc:
            _remove_quietly(staging)
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        # kombu truncates the exchange file before it takes its lock, so a process reading the bindings at
        # that moment (every send does) reads an empty file and fails. Binders here take turns on a lock
        # file and replace the exchange file whole, so readers see the old bindings or the new ones.
        file = self._exchange_file(exchange)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with open(file.with_name(file.name + ".lock"), "ab") as guard:
            filesystem.lock(guard, filesystem.LOCK_EX)
            try:
                bindings = self.get_table(exchange)
                if binding in bindings:
                    return
                staging = file.with_name(f"{file.name}.{uuid.uuid4().hex}{STAGING_SUFFIX}")
                staging.write_bytes(str_to_bytes(dumps([binding, *bindings])))
                os.replace(staging, file)
            finally:
                filesystem.unlock(guard)

    def _get(self, queue: str) -> dict:
        for name in sorted(os.listdir(self.data_folder_in)):
            if message_queue(name) != queue:
                continue
            claimed = os.path.join(self.claimed_folder, name)
            try:
                # Atomic on one filesystem: of several consumers exactly one renames the file away.
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except OSError:
                continue  # another consumer took it first
            try:
                with open(claimed, "rb") as source:
                    payload = source.read()
            except OSError as exc:
                raise filesystem.ChannelError(f"Cannot read file {claimed!r} from queue.") from exc
            finally:
                _remove_quietly(claimed)
            try:
                return loads(bytes_to_str(payload))
            except ValueError:
                log.warning("dropped unreadable message file %s (%d bytes)", name, len(payload))
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel

    def __init__(self, client, **kwargs):  # noqa: ANN001, ANN003 - kombu's signature
        super().__init__(client, **kwargs)
        # kombu shares one record of declared bindings among every filesystem connection in the process and
        # skips binding what it records, so a connection could send before another had written the exchange
        # file (its messages routed nowhere), and a second queue folder would never get one. Each connection
        # keeps its own record here; binding again is cheap and idempotent (`Channel._queue_bind`).
        self.state = virtual.BrokerState()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
