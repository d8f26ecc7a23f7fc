"""The HTTP gateway: browsers and scripts reach the same sessions, identities and workers
as is.js, over HTTP (``is-gateway``), with a viewer page at ``/``.

It is a second front door beside the ZeroMQ bridge, not a second path: every request is
checked by :class:`bridge.sessions.SessionVerifier`, mapped to a UID:GID by
:class:`queues.identity.IdentityResolver` and sent by :class:`bridge.dispatch.CeleryDispatcher`
as the same Celery task (``is.jpeg``/``is.spots``/``is.index``) to the same queue. Like the
rest of the bridge it never imports numpy or h5py.
"""
