"""One shared stand-in single-user server for every benchmark spawn: any path answers 200.

The hub only checks ``<server url>api`` for a non-5xx answer, so one asyncio HTTP server can stand
in for a thousand Jupyter servers at almost no cost (one process, a few MB per thousand requests).
Run as ``python -m benchmarks.standin PORT``.
"""

from __future__ import annotations

import sys

from aiohttp import web

BODY = b'{"standin": true}'


async def answer(request: web.Request) -> web.Response:
    # X-JupyterHub-Version spares the hub a version-mismatch warning per spawn.
    return web.Response(body=BODY, content_type="application/json", headers={"X-JupyterHub-Version": "6.1.1"})


def main(argv: list[str]) -> None:
    port = int(argv[1])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main(sys.argv)
