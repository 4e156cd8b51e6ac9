"""A client of the older launcher worker, as services wrote them: launch a server, read it, remove it.

    python launch_notebook.py USERNAME IMAGE

It calls the worker's tasks by name through Celery, with celery-config.py beside it. Run against
`jupyterhub-launcher celery-bridge`, it works unchanged.
"""

import sys

from celery import Celery

celery = Celery()
celery.config_from_object("celery-config")


def main(username: str, image: str) -> int:
    server = celery.send_task(
        "launcher-worker.launch",
        args=[image, username],
        kwargs={"cpu": {"request": 0.5, "limit": 1}, "memory": {"request": "512M", "limit": "1G"}},
    ).get(timeout=600)
    if server is None:
        print("launch failed")
        return 1
    # The older worker's clients opened '<url>?token=<token>'; the token is not printed here.
    print("launched:", server["url"])

    model = celery.send_task("launcher-worker.read", args=[username]).get(timeout=60)
    print("ready:", model is not None and model["ready"])

    removed = celery.send_task("launcher-worker.remove", args=[username]).get(timeout=120)
    print("removed:", removed)
    return 0 if removed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
