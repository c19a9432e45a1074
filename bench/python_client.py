"""What ARL's Python client adds to an execute: `x + 1` on one session, alternately through a
raw `httpx.Client` POST (its JSON parsed) and through `arl.Client`'s `session.execute`, both
with keep-alive. Usage: python_client.py BASE_URL N. Prints one JSON line of p50/p99 in ms."""

import json
import sys
import time

import httpx

import arl


def percentiles(samples: list[float]) -> list[float]:
    samples.sort()
    return [samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]]


def main(base: str, n: int) -> None:
    client = arl.Client(base)
    session = client.create_session()
    session.execute("x = 1")
    raw = httpx.Client(base_url=base)
    path = f"/v1/sessions/{session.id}/execute"
    raw_ms: list[float] = []
    client_ms: list[float] = []
    for i in range(n + 50):
        t = time.perf_counter()
        answer = raw.post(path, json={"code": "x + 1"})
        assert answer.json()["result"] == "2"
        raw_took = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        assert session.execute("x + 1").result == "2"
        client_took = (time.perf_counter() - t) * 1e3
        if i >= 50:  # the first ones warm the connections up
            raw_ms.append(raw_took)
            client_ms.append(client_took)
    session.delete()
    print(json.dumps({"raw": percentiles(raw_ms), "client": percentiles(client_ms)}))


main(sys.argv[1], int(sys.argv[2]))
