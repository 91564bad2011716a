"""Benchmarks anyone can rerun: `python -m bench.sampler`, `python -m bench.service`,
`python -m bench.agreement` and `bench/gpu.sh` (see docs/benchmarks.md).

Each prints one JSON object per line (`--json`) and can draw a PNG plot (`--plot FILE`).
"""
