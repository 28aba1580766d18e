"""A DHT call that never answers (a hung DHT process) fails after the progress board's deadline,
logged, instead of holding every later store behind it; reads keep the last good view."""

import asyncio
import logging
import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import ProgressRecord

pytestmark = pytest.mark.timeout(20)


class _DHT:
    """The two calls the board makes of ``hivemind.DHT``, answered or left hanging as the test says."""

    def __init__(self) -> None:
        self.hang, self.stored = True, []

    def _future(self, result: object) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if not self.hang:
            future.set_result(result)
        return future

    def store(self, key, value, expiration, subkey=None, return_future=False):
        if not self.hang:
            self.stored.append(value)
        return self._future(True)

    def get(self, key, latest=False, return_future=False):
        return self._future(None)


def _record(step: int) -> ProgressRecord:
    return ProgressRecord(peer_id="me", outer_step=step, tokens=100, tokens_per_s=10.0, loss=2.0,
                          params_sha256="", client_mode=False, time=get_dht_time())


def test_a_dht_call_without_an_answer_fails_after_the_deadline_and_the_next_store_goes_through(caplog):
    async def scenario():
        dht = _DHT()
        board = ProgressBoard(dht, "r", RSASignatureValidator(), "me", 30.0, call_timeout=0.3)
        started = time.monotonic()
        await board.publish_now(_record(1))  # never answered
        records = await board.read(max_age=0.0)  # never answered either
        took = time.monotonic() - started
        dht.hang = False
        await board.publish_now(_record(2))  # the store lock was let go: this one lands
        return took, records, dht.stored, board.stored_at(1), board.stored_at(2)

    with caplog.at_level(logging.WARNING, logger="p2p_trainer.swarm.progress"):
        took, records, stored, at_1, at_2 = asyncio.run(scenario())
    assert took < 3.0, took  # two deadlines of 0.3 s, not forever
    assert caplog.text.count("no answer from the DHT within 0.3s") == 2, caplog.text
    assert list(records) == ["me"] and records["me"].outer_step == 1  # our own view does not wait
    assert [r["outer_step"] for r in stored] == [2] and not at_1 and at_2
