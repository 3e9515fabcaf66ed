"""Requests the gateway must answer with a documented 4xx, never a 500: the odd inputs found while
deriving the OpenAPI document of /v1 and fuzzing the gateway against it."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import PLATFORM_TOKEN, RunningBroker

NS = "team-platform"
PLATFORM = {"Authorization": f"Bearer {PLATFORM_TOKEN}"}


async def test_a_wrong_method_names_the_allowed_ones(running_broker: RunningBroker):
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"{running_broker.http_url}/v1/resources", headers=PLATFORM) as response,
    ):
        assert response.status == 405
        # aiohttp answers HEAD wherever it answers GET.
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
        assert (await response.json())["error"]["code"] == 405


@pytest.mark.parametrize("value", ["12\n", "\u0661\u0662", " 12", "1_000"])
async def test_an_integer_is_ascii_digits_only(running_broker: RunningBroker, value: str):
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{running_broker.http_url}/v1/resources",
            headers=PLATFORM,
            json={"namespace": NS, "pageSize": value},
        ) as response,
    ):
        answer = await response.json()

    assert response.status == 400
    assert [v["field"] for v in answer["error"]["fieldViolations"]] == ["page_size"]


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b'{"namespace": ' * 50_000 + b"1" + b"}" * 50_000],
    ids=["arrays", "objects"],
)
async def test_json_nested_too_deeply_is_400_not_500(running_broker: RunningBroker, raw: bytes):
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{running_broker.http_url}/v1/resources", headers=PLATFORM, data=raw) as response,
    ):
        answer = await response.json()

    assert response.status == 400
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "nested too deeply" in answer["error"]["message"]
