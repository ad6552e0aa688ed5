"""Tooling outside the runtime package: the speed benchmark (bench.py) and the load test
(loadtest.py), run from a checkout as `covidxr bench` / `covidxr loadtest` (or
`python -m benchmarks.bench`). They print their results; they write files only where told
(`--markdown BENCHMARKS.md`, `--json FILE`)."""
