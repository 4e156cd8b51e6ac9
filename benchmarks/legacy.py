"""The older worker's launch algorithm, as the baseline a user has today (scenario 3).

Blocking ``requests``: create the user, create a token, POST the server, then ``time.sleep(2)`` and
``GET /users/{u}`` until the server is ready (sleep first, as the older worker's loop did: its
measured detection lag, p50 1.8 s, is one sleep). Module-level functions, so worker processes can
run them.
"""

from __future__ import annotations

import time
from typing import Any

import requests

POLL_INTERVAL = 2.0  # the older worker's time.sleep(2)
POLL_LIMIT = 300  # bounded: 10 minutes of polling at most


def launch(api_url: str, token: str, username: str, image: str) -> dict[str, Any]:
    """One launch as the older worker ran it; timestamps on the wall clock (comparable across processes)."""
    started = time.time()
    headers = {"Authorization": f"token {token}"}
    with requests.Session() as http:
        try:
            http.post(f"{api_url}/users/{username}", headers=headers, timeout=60)  # 201, or 409 if it exists
            token_reply = http.post(
                f"{api_url}/users/{username}/tokens",
                json={"expires_in": 1800, "note": "legacy", "scopes": [f"access:servers!server={username}/"]},
                headers=headers,
                timeout=60,
            )
            token_reply.raise_for_status()
            start = http.post(f"{api_url}/users/{username}/server", json={"image": image}, headers=headers, timeout=60)
            if start.status_code not in (201, 202):
                return {
                    "username": username,
                    "started": started,
                    "replied": time.time(),
                    "ok": False,
                    "error": f"start answered {start.status_code}",
                }
            for _ in range(POLL_LIMIT):
                time.sleep(POLL_INTERVAL)
                user = http.get(f"{api_url}/users/{username}", headers=headers, timeout=60).json()
                server = (user.get("servers") or {}).get("") or {}
                if server.get("ready"):
                    return {"username": username, "started": started, "replied": time.time(), "ok": True}
            return {"username": username, "started": started, "replied": time.time(), "ok": False, "error": "timeout"}
        except requests.RequestException as error:
            return {
                "username": username,
                "started": started,
                "replied": time.time(),
                "ok": False,
                "error": type(error).__name__,
            }
