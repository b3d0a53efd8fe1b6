"""The serving stage behind serve.py, split by what a reader looks for. Arrows point down:

    app         Server and the HTTP routes (FastAPI); chat/completions: prepare, run, stream | collect;
                vLLM's tokenizer routes
    protocol    OpenAI's shapes: ApiError, request parsing, completion ids, response and chunk bodies,
                log-probs
    engine      continuous batching on one thread that owns the model (no HTTP)
    decode      the engine's fused decode step; int8 weights
    text        prompt ids; TextStream: UTF-8 hold-back, stop strings, the output filter
    moderation  the blocklist with OpenAI's categories, and the optional classifier
    limits      API keys, token buckets, abuse blocks
    store       requests, feedback, rate limits and blocks in SQLite or PostgreSQL; the feedback export
    metrics     Prometheus metrics, a registry per app
    config      ServeConfig (serve.py's options) and paths
    launch      serve.py (or llama-server) as a subprocess on a free loopback port: the main
                job's feedback stage and the benchmarks

Importing the package imports none of them: `import serving.engine` does not need FastAPI.
"""
