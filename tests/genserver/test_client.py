"""The client's failure behaviour: a dead or silent server raises a clear error quickly, and /generate is
never re-sent once it may have reached the server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from asyncgrpo.sglang.client import SGLangClient, SGLangError, SGLangUnavailable

from .procs import free_port


def test_dead_server_raises_unavailable_naming_url_and_endpoint() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here

    async def main():
        async with SGLangClient(url, retries=2, backoff_s=0.01) as c:
            assert await c.health() is False
            with pytest.raises(SGLangUnavailable) as ei:
                await c.generate([1, 2], {"max_new_tokens": 2})
            return str(ei.value)

    msg = asyncio.run(main())
    assert url in msg and "/generate" in msg and "unreachable after 3 attempts" in msg


def test_silent_server_times_out_instead_of_hanging() -> None:
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"

        async def main():
            async with SGLangClient(url, timeout_s=0.3, retries=1, backoff_s=0.01) as c:
                with pytest.raises(SGLangUnavailable, match="/v1/loads"):
                    await c.loads()  # read-only: retried, then unavailable
                with pytest.raises(SGLangError, match="not retried since the request may have run"):
                    await c.generate([1], {"max_new_tokens": 1})

        asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.slow
def test_generate_read_timeout_is_not_retried(genserver) -> None:
    async def main():
        async with SGLangClient(genserver.url) as admin, SGLangClient(genserver.url, timeout_s=0.5, retries=3) as c:
            before = (await admin.server_info())["internal_states"][0]["requests"]
            await admin.pause("in_place")
            try:
                with pytest.raises(SGLangError) as ei:
                    await c.generate([5, 6, 7], {"max_new_tokens": 2}, rid="no-retry-1")
                await asyncio.sleep(1.0)  # a retry, had there been one, would have arrived by now
                received = (await admin.server_info())["internal_states"][0]["requests"] - before
                for _ in range(100):  # the server notices the client gave up and drops the request
                    if (await admin.loads())["loads"][0]["num_waiting_reqs"] == 0:
                        break
                    await asyncio.sleep(0.05)
                waiting = (await admin.loads())["loads"][0]["num_waiting_reqs"]
            finally:
                await admin.abort("no-retry-")
                await admin.resume()
            return ei.value, received, waiting

    err, received, waiting = asyncio.run(main())
    assert not isinstance(err, SGLangUnavailable) and "may have run" in str(err)
    assert received == 1  # sent once, not retries + 1 times
    assert waiting == 0  # aborted when the client disconnected


def test_waiting_for_a_free_connection_is_not_a_connect_timeout() -> None:
    """Requests beyond the pool wait for a connection within the request's timeout, not the connect timeout:
    a burst of resubmitted samples must not fail as "unreachable" against a busy but healthy server."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: answer every request on this connection, each after 0.3 s
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the client closed the connection
                return
            await asyncio.sleep(0.3)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"loads\":[]}")
            await writer.drain()

    async def main() -> list[object]:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with SGLangClient(url, timeout_s=10, connect_timeout_s=0.1, retries=0, max_connections=1) as c:
                return await asyncio.gather(*(c.loads() for _ in range(3)), return_exceptions=True)
        finally:
            server.close()

    results = asyncio.run(asyncio.wait_for(main(), 20))
    assert results == [{"loads": []}] * 3, results  # the 2nd and 3rd waited ~0.3 and ~0.6 s for the one connection
