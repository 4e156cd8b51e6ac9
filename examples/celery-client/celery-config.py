# The Celery configuration of a service that calls the older launcher worker: Redis as broker and
# result backend. Moving to jupyterhub-launcher changes nothing here; the bridge listens on the same
# broker and queue. (The environment variables only let the project's tests point it elsewhere.)
import os

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0")
task_default_queue = os.environ.get("CELERY_QUEUE", "celery")
