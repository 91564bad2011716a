"""HTTP API of the STAR service: request schemas, queue protocol, storage, settings.

Never imports torch, `model` or `worker` (tests/app/test_api.py::test_importing_the_api_does_not_import_torch
proves it), so the API image stays small.
"""
