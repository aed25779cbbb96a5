"""The wire formats, each a thin mapping between its bodies and the one generation request (``predictor.request``):
``generate`` (+ Server-Sent Events), ``kserve_v1``, ``kserve_v2`` and ``openai`` (generations and edits). Each
declares its routes' metadata (``ROUTES``: body limit, error shape); ``sse`` is the one event-stream writer."""

from __future__ import annotations

from predictor.protocols import generate, kserve_v1, kserve_v2, openai
from predictor.protocols.base import RouteTable

ROUTES = RouteTable((*generate.ROUTES, *kserve_v1.ROUTES, *kserve_v2.ROUTES, *openai.ROUTES))
