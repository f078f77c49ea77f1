"""The /predict batcher in process: who shares a batch, what each request gets back, load shedding.

The model is a stand-in that records its batches and can be held busy, so which requests queue behind a
running batch is decided by the test, not by timing. The service's own batching over HTTP is tested in
tests/test_service_http.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.batcher import Batcher
from tuneloop.errors import Unavailable


class Model:
    """Upper-cases texts; records each batch; `hold` keeps the running batch busy until released."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()

    def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(texts)
        self.running.set()
        assert self.hold.wait(10)
        if self.fail_on in texts:
            raise RuntimeError(f"cannot score {self.fail_on!r}")
        return [text.upper() for text in texts]


async def until(condition: threading.Event) -> None:
    assert await asyncio.to_thread(condition.wait, 10)


def test_a_lone_request_runs_at_once_and_requests_that_queue_meanwhile_share_the_next_batch() -> None:
    model = Model()

    async def scenario() -> list[list[str]]:
        batcher = Batcher(model, max_texts=5, max_wait_s=10)
        model.hold.clear()
        first = asyncio.create_task(batcher.submit(["a"]))
        await until(model.running)  # running alone: nothing else had arrived
        queued = [asyncio.create_task(batcher.submit(texts)) for texts in (["b", "c"], ["d"], ["e", "f"], ["g"])]
        await asyncio.sleep(0.05)
        model.hold.set()
        answers = await asyncio.gather(first, *queued)
        batcher.close()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [["A"], ["B", "C"], ["D"], ["E", "F"], ["G"]]  # each request its own slice, in order
    # What queued ran together, in arrival order, up to 5 texts: the request that would overflow starts the next.
    assert model.batches == [["a"], ["b", "c", "d", "e", "f"], ["g"]]


def test_a_request_over_the_batch_limit_runs_whole_and_alone() -> None:
    model = Model()

    async def scenario() -> list[list[str]]:
        batcher = Batcher(model, max_texts=2, max_wait_s=10)
        model.hold.clear()
        first = asyncio.create_task(batcher.submit(["a"]))
        await until(model.running)
        big, small = asyncio.create_task(batcher.submit(["b", "c", "d"])), asyncio.create_task(batcher.submit(["e"]))
        await asyncio.sleep(0.05)
        model.hold.set()
        return await asyncio.gather(first, big, small)

    assert asyncio.run(scenario()) == [["A"], ["B", "C", "D"], ["E"]]
    assert model.batches == [["a"], ["b", "c", "d"], ["e"]]


def test_a_failed_batch_fails_its_requests_only_and_the_next_batch_runs() -> None:
    model = Model(fail_on="bad")

    async def scenario() -> tuple[list[object], list[str]]:
        batcher = Batcher(model, max_texts=2, max_wait_s=10)
        model.hold.clear()
        first = asyncio.create_task(batcher.submit(["a"]))
        await until(model.running)
        failing = [asyncio.create_task(batcher.submit(t)) for t in (["bad"], ["c"])]
        after = asyncio.create_task(batcher.submit(["d"]))
        await asyncio.sleep(0.05)
        model.hold.set()
        results = await asyncio.gather(first, *failing, return_exceptions=True)
        return results, await after

    results, after = asyncio.run(scenario())
    assert results[0] == ["A"]
    assert all(isinstance(r, RuntimeError) and "cannot score 'bad'" in str(r) for r in results[1:]), results
    assert after == ["D"] and model.batches[-1] == ["d"]


def test_a_request_whose_client_left_is_not_run() -> None:
    model = Model()

    async def scenario() -> list[str]:
        batcher = Batcher(model, max_texts=8, max_wait_s=10)
        model.hold.clear()
        first = asyncio.create_task(batcher.submit(["a"]))
        await until(model.running)
        gone, kept = asyncio.create_task(batcher.submit(["gone"])), asyncio.create_task(batcher.submit(["kept"]))
        await asyncio.sleep(0.05)
        gone.cancel()  # what Starlette does to the handler of a disconnected client
        await asyncio.sleep(0.01)
        model.hold.set()
        await first
        return await kept

    assert asyncio.run(scenario()) == ["KEPT"]
    assert model.batches == [["a"], ["kept"]]


def test_a_request_that_would_wait_longer_than_the_budget_is_refused_and_the_rest_answered() -> None:
    model = Model()

    async def scenario() -> tuple[list[object], float]:
        batcher = Batcher(model, max_texts=4, max_wait_s=1.0)
        assert await batcher.submit(["warm"]) == ["WARM"]  # the first batch measures a text's cost
        batcher.seconds_per_text = 0.1  # as if measured: 10 texts queued fill the 1 s budget
        model.hold.clear()
        first = asyncio.create_task(batcher.submit(["a"]))
        await until(model.running)
        queued = [asyncio.create_task(batcher.submit([f"t{i}", f"u{i}"])) for i in range(8)]
        await asyncio.sleep(0.05)
        model.hold.set()
        return await asyncio.gather(first, *queued, return_exceptions=True), batcher.seconds_per_text

    results, _ = asyncio.run(scenario())
    answered = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, Unavailable)]
    assert len(answered) + len(refused) == len(results)
    # 2 texts a request at 0.1 s: the 5th queued request would wait 1.0 s with its own texts, the 6th 1.2 s.
    assert len(answered) == 1 + 5 and len(refused) == 3, results
    assert all("serve.max_latency_ms=1000" in str(r) for r in refused)
    assert {text for batch in model.batches for text in batch} >= {"t0", "u0", "t4", "u4"}
    assert not any("t5" in batch for batch in model.batches)


def test_the_cost_estimate_follows_measured_batches_and_nothing_is_refused_before_one() -> None:
    model = Model()

    async def scenario() -> float:
        batcher = Batcher(model, max_texts=4, max_wait_s=0.0)  # any predicted wait is too long, once measured
        answers = await asyncio.gather(*(batcher.submit([str(i)]) for i in range(3)))
        assert answers == [["0"], ["1"], ["2"]]  # no estimate yet for the first: nothing refused
        return batcher.seconds_per_text

    assert asyncio.run(scenario()) > 0


def test_after_close_requests_are_refused_with_what_to_do() -> None:
    async def scenario() -> None:
        batcher = Batcher(Model(), max_texts=4, max_wait_s=1)
        batcher.close()
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit(["a"])

    asyncio.run(scenario())
