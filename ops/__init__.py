"""What operators and admins use: ``isctl`` and its subcommands (render, meta, get,
session, status, flower, prefetch), the local stack of ``isctl up`` with its private
redis-server and dev sessions, and generators of demo/test detector files.

The deploy files live beside this package in subfolders (``systemd/``, ``redis/``,
``sysusers.d/``, ``is.env``). Nothing in ``istasks``, ``queues`` or ``bridge`` imports
this package: operators' tools sit on top of the service, never inside it.
"""
