"""jupyterhub-launcher: starts, reads and stops Jupyter servers through JupyterHub on command.

Kept import-light: JupyterHub loads ``consumer.spawner`` without the consumer's dependencies.
"""

__version__ = "0.1.0"
