"""HTTP API of the STAR service: request schemas, queue protocol, storage, settings.

Never imports torch or `model` (tests/app/test_no_torch.py proves it), so the API image stays small.
"""
