"""A stand-in single-user server: any path answers 200, so hub spawns cost ~20 MB and no Jupyter.

The hub only needs a non-5xx answer at ``<server url>api``. ``STANDIN_DELAY`` (s) delays listening,
to make spawns slow.
``<server url>api/launcher-env`` shows the process's environment (without the hub's own secrets),
so tests can see which options reached the process.
"""

from __future__ import annotations

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server's naming
        if self.path.rstrip("/").endswith("/api/launcher-env"):
            body = json.dumps({k: v for k, v in os.environ.items() if "TOKEN" not in k and "SECRET" not in k}).encode()
        else:
            body = b'{"standin": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-JupyterHub-Version", os.environ.get("STANDIN_HUB_VERSION", "6.1.1"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    time.sleep(float(os.environ.get("STANDIN_DELAY", "0")))
    url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    ThreadingHTTPServer((url.hostname or "127.0.0.1", url.port or 80), Handler).serve_forever()


if __name__ == "__main__":
    main()
