"""Benchmarks: how fast, how small and how quiet the agent is, against same-run baselines.

``python -m bench`` (see :mod:`bench.__main__`) starts its own sandbox and measures, each
against a baseline taken in the same run on the same broker and emulator:

* :mod:`bench.roundtrip` - a Jobs request through our client vs a raw awscrt publish -> echo;
* :mod:`bench.latency` - job queued -> handler running vs a round trip plus a bare spawn;
* :mod:`bench.throughput` - jobs/s vs the loop an engineer writes from the awsiotsdk sample;
* :mod:`bench.idle` - idle RSS/CPU and start-up time vs a bare awsiotsdk client;
* :mod:`bench.flatness` - RSS and journal size after thousands of jobs.

Helpers that run as their own processes: :mod:`bench.rt_client`, :mod:`bench.sample_loop`,
:mod:`bench.bare_client`. Standard library plus the agent's own dependencies only.
"""
