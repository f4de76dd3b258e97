"""A flood of chat requests from one key, in its own process: ``python -m tests.flood_client URL KEY CLIENTS``. Each
client, on its own keep-alive connection, sends n=16 requests until stdin closes, waiting ``Retry-After`` after a 429
as the SDK does; then the counts are printed as one JSON line.

Plain HTTP/1.1 over asyncio streams rather than httpx: on a two-core test machine the client's own CPU time would
otherwise weigh on the server it floods, which is not what the fairness test measures."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from urllib.parse import urlsplit

BODY = json.dumps({"model": "alignd", "messages": [{"role": "user", "content": "How do I bake bread at home?"}],
                   "n": 16, "temperature": 1.0, "max_tokens": 64, "ignore_eos": True}).encode()


async def _client(host: str, port: int, request: bytes, stop: threading.Event, counts: dict[str, object]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while not stop.is_set():
            writer.write(request)
            status, headers, body = await _response(reader)
            if status == 429:
                counts["refused"] += 1  # type: ignore[operator]
                await asyncio.sleep(float(headers["retry-after"]))
            elif status == 200 and len(json.loads(body)["choices"]) == 16:
                counts["ok_n16"] += 1  # type: ignore[operator]
            else:
                counts["errors"].append(f"{status} {body[:200]!r}")  # type: ignore[attr-defined]
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    return int(head[0].split(" ")[1]), headers, await reader.readexactly(int(headers["content-length"]))


async def flood(url: str, key: str, clients: int, stop: threading.Event) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    counts: dict[str, object] = {"ok_n16": 0, "refused": 0, "errors": []}
    await asyncio.gather(*(_client(host, port, request, stop, counts) for _ in range(clients)))
    return counts


def main() -> None:
    url, key, clients = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps(asyncio.run(flood(url, key, clients, stop))), flush=True)


if __name__ == "__main__":
    main()
