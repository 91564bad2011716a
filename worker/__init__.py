"""The worker process: holds one model, takes queued jobs in batches, stores PNGs.

The only package that imports both `app` (the job protocol app.jobs, storage, schemas) and `model`.
"""
