"""Without a network: the bytes-in-flight budget HTTP bodies hold (the layer's one ReadAhead),
service/triton/http_front.py's config JSON."""

from __future__ import annotations

import asyncio

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.protocol.inbox import ReadAhead
from service.triton.http_front import config_json


def test_requests_wait_until_their_bytes_fit_and_one_always_fits() -> None:
    async def scenario() -> list[str]:
        budget, order = ReadAhead(total=10), []
        first_in, release_first = asyncio.Event(), asyncio.Event()

        async def request(name: str, size: int, hold: asyncio.Event | None = None) -> None:
            async with budget.hold(size):
                order.append(f"{name} in ({budget.used})")
                if hold is not None:
                    first_in.set()
                    await hold.wait()
            order.append(f"{name} out")

        first = asyncio.create_task(request("a", 6, release_first))
        await first_in.wait()
        second = asyncio.create_task(request("b", 6))
        huge = asyncio.create_task(request("c", 10_000))  # capped at the whole budget
        await asyncio.sleep(0.01)
        assert order == ["a in (6)"] and budget.used == 6  # b and c wait
        release_first.set()
        await asyncio.gather(first, second, huge)
        assert budget.used == 0
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["a in (6)", "a out"]
    assert sorted(order[2:]) == ["b in (6)", "b out", "c in (10)", "c out"]


def test_a_cancelled_waiter_takes_nothing() -> None:
    async def scenario() -> int:
        budget = ReadAhead(total=4)
        async with budget.hold(4):
            waiter = asyncio.create_task(budget.hold(4).__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        return budget.used

    assert asyncio.run(scenario()) == 0


def test_config_json_writes_every_field_and_64_bit_integers_as_numbers() -> None:
    config = text_format.Parse(
        """name: "m" max_batch_size: 8
        input [{ name: "tokens" data_type: TYPE_INT64 dims: [-1] }]
        dynamic_batching { max_queue_delay_microseconds: 100
          priority_queue_policy { key: 3 value { default_timeout_microseconds: 7 } } }""",
        mc.ModelConfig(),
    )
    doc = config_json(config)
    assert doc["input"][0]["dims"] == [-1] and doc["input"][0]["optional"] is False
    batching = doc["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 100
    assert batching["priority_queue_policy"]["3"]["default_timeout_microseconds"] == 7
    assert batching["priority_queue_policy"]["3"]["max_queue_size"] == 0  # a default, as a number
    assert doc["output"] == [] and doc["parameters"] == {}
