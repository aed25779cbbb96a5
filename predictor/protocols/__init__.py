"""The wire formats, each a thin mapping between its bodies and the one generation request (``predictor.request``):
``generate`` (+ Server-Sent Events), ``kserve_v1``, ``kserve_v2`` and ``openai`` (generations and edits). Each
declares its routes' metadata (``ROUTES``: body limit, error shape), which the server gathers into one table;
``sse`` is the one event-stream writer."""
