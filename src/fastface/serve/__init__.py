"""Front ends on the library: the HTTP API (``fastface serve``), its Ray Serve scale-out and the web UI.

``engine`` is the one place that maps a request onto library calls (validation, models loaded once,
identities analysed once); ``batching`` runs every pipeline call on one worker thread and merges
concurrent compatible requests into one batched call; ``app`` is the FastAPI application;
``ray_app`` serves the same application from Ray Serve replicas. The web UI (``fastface.ui``) uses
the same engine and batcher.

Nothing here is imported by ``import fastface``: FastAPI, Gradio and Ray are optional extras.
"""
