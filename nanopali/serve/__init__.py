"""`nanopali serve`: an OpenAI-compatible HTTP server with continuous batching, limits and a web page.

    app.py         routes and errors                  api.py      the OpenAI / task-endpoint JSON dialect
    middleware.py  the API key, body limit, counting  engine.py   the thread that steps the batch
    images.py      image URLs under the policy        metrics.py  Prometheus metrics
    server.py      the socket and uvicorn             page.html   the web page (self-contained, offline)

A layer on top of the pipeline, beside the CLI: every answer comes from `Pali.row` / `Pali.batch` /
`Pali.result` (nanopali/pipeline.py), so the server adds no second path from image to answer. Its
dependencies are the `serve` extra (FastAPI, uvicorn, prometheus_client); `import nanopali` never loads it.
"""
