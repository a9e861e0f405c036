"""The rawproxy benchmark harness (``make bench``; ``python -m benchmarks.run``).

Runs the same workloads through each peer (direct, rawproxy, HAProxy, nginx
``stream``, a plain asyncio proxy, the same on uvloop), each proxy pinned to
CPU 0 and every client and backend to CPU 1, alternating peers over rounds,
and prints a table of medians with ratios to HAProxy and to the direct path.

Layout, one job per module::

    run.py           options, rounds, orchestration, the summary table
    peers.py         how each peer proxy is configured, started and stopped
    backends.py      the backends each workload proxies to (iperf3, redis, nginx, echo)
    loadgen.py       external load generators (iperf3, redis-benchmark, wrk): run and parse
    pyclients.py     the clients written here: idle hold + echo latency, integrity
    procs.py         child processes: CPU pinning, ports, readiness, RSS, stop
    report.py        medians, ratios, the text table and the JSON document
    echo_server.py   a selectors echo backend (run as a script on CPU 1)
    asyncio_proxy.py the afternoon asyncio proxy peer (``--uvloop`` for uvloop)

Nothing here is imported by ``rawproxy``; the harness needs only the
standard library (uvloop is optional, for its own row).
"""
