"""The admin JSON API under ``/api/admin``, as NexusGate's (paths, camelCase fields).

One blueprint (``blueprint``: the admin-secret guard, refusals as JSON, the request
helpers) and a module per resource: ``keys``, ``catalog`` (providers, models, per-model
limits), ``records`` (completions, embeddings), ``usage`` (token sums, costs, the
overview) and ``operations`` (server logs, settings). The views are thin: the checked
changes to keys, providers, models and per-model limits live in ``registry`` (the
dashboard makes them too), record lists in ``records``, JSON shapes in ``serializers``.
Creates answer 200 with the object, as NexusGate's do (its scripts check for 200).
Gateway keys leave in full only once, at creation. No input gets a 5xx: bodies are
strict JSON (``jsonio``), ids in paths are 1 to 2^63-1 (else 404), query integers are
ASCII digits within bounds, and NUL is refused.
"""

from __future__ import annotations

from gateway.admin_api import catalog, keys, operations, records, usage  # noqa: F401 - routes
from gateway.admin_api.blueprint import bp

__all__ = ["bp"]
