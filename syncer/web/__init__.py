"""The daemon's HTTP server (``[http]``): a status page, the user lookup, ``/metrics`` and
``/healthz``. Read-only; its SQL lives in :mod:`syncer.store.status`."""

from syncer.web.server import StatusServer

__all__ = ["StatusServer"]
