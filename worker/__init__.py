"""The worker process: holds one model, takes queued jobs in batches, stores PNGs.

The only package that imports both `app` (queue protocol, storage, settings) and `model`.
"""
