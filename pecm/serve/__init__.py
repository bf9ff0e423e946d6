"""`pecm serve`: the HTTP API over archive indexes and a checkpoint (FastAPI + uvicorn; ``pip install
'pecm[serve]'``). Modules: `app` (routes, auth, metrics middleware), `batcher` (micro-batching of searches),
`state` (the open indexes and encoder, ingest, images), `parse` (request validation), `errors`, `metrics`.
See docs/serve.md.
"""
