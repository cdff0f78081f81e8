"""dpo-cluster: DPO on a Ray cluster (Ray Data, Ray Train + DeepSpeed, Ray Serve).

Layers, highest first; a module imports its own layer or lower ones only
(`tests/test_layering.py` checks every import, lazy ones included):

    cli                         the command line (jobs/ and serve/ outside the package sit here too)
    bench, demo, rounds         programs built from the parts below
    evaluation, serving         judge and serve a trained model
    train                       the per-worker loop, DeepSpeed engine, checkpoints, Ray Train driver
    reference                   reference log-probs: precomputed by an actor pool, cached, streamed
    batch                       padded and packed micro-batches, per-sequence log-probs of a forward
    data                        sources, formats, tokenization, the Ray Data pipeline, accounting
    modeling, tiny,             models by name, built-in models, .gguf conversion, memory-saving
    gguf_models, mlp_recompute  patches
    config                      one strict tree of dataclasses; no torch needed to import it
    losses, logprobs, stats,    pure math and small utilities (torch, Ray or the standard library)
    paths, plots, ray_session
"""

__version__ = "0.1.0"
