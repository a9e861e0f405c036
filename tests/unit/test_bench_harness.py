"""The benchmark harness's pure parts: tool output in, numbers out.

``make bench`` itself needs the peers and load generators installed and
minutes of quiet machine, so it is not part of ``make test``; what decides
its figures (parsing, CPU accounting, medians and ratios) is checked here.
"""

from __future__ import annotations

import pytest

from benchmarks import loadgen, procs, syscalls, workloads
from benchmarks.report import ROWS, Record, Summary, render_table

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:21001/tiny
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.01ms    2.10ms  30.00ms   80.00%
  Latency Distribution
     50%    7.50ms
     75%    9.00ms
     90%   11.00ms
     99%   15.90ms
  30235 requests in 5.00s, 7.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:   6047.00
Transfer/sec:      1.50MB
"""


def test_wrk_output_gives_rate_latency_requests_and_errors() -> None:
    metrics = loadgen.parse_wrk(WRK_OUTPUT)
    assert metrics == {"conn_rps": 6047.0, "errors": 3.0, "requests": 30235.0,
                       "p99_ms": 15.9}


def test_redis_csv_keeps_each_test() -> None:
    text = ('"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms"\n'
            '"PING_INLINE","40000.00","1.0","0.1","0.90"\n'
            '"PING_MBULK","41000.00","1.0","0.1","0.93"\n'
            '"SET","45300.00","1.0","0.1","0.80"\n')
    metrics = loadgen.parse_redis_csv(text)
    assert metrics["ping_rps"] == 41000.0
    assert metrics["ping_p50_ms"] == 0.93
    assert metrics["set_rps"] == 45300.0
    assert "get_rps" not in metrics


def test_iperf3_error_document_is_a_bench_error() -> None:
    with pytest.raises(procs.BenchError, match="the server is busy"):
        loadgen.parse_iperf3('{"error": "the server is busy"}')


def test_stat_line_with_spaces_in_the_name_gives_user_and_system_ticks() -> None:
    # Fields 14 and 15 (utime, stime) are 250 and 50; the name has ") (" in it.
    stat = ("4242 (py (worker) 1) S 1 4242 4242 0 -1 4194304 900 0 0 0 "
            "250 50 0 0 20 0 3 0 100 1000 200")
    assert procs.parse_stat_cpu_ticks(stat) == (250, 50)


@pytest.mark.parametrize("name, metrics, key, expected", [
    # 4 redis tests of 10,000 requests each, 0.4 CPU s: 10 us a request.
    ("reqresp", {"requests_per_test": 10_000.0}, "cpu_us_per_req", 10.0),
    ("churn", {"requests": 20_000.0}, "cpu_us_per_conn", 20.0),
    # 0.4 CPU s for 2 GB.
    ("bulk1", {"bytes": 2e9}, "cpu_s_per_gb", 0.2),
])
def test_cpu_is_divided_by_the_work_done(name: str, metrics: dict[str, float], key: str,
                                         expected: float) -> None:
    derived = workloads.cpu_metrics(name, metrics, user_s=0.1, system_s=0.3, wall_s=2.0)
    assert derived[key] == pytest.approx(expected)
    assert derived["cpu_pct"] == pytest.approx(20.0)
    assert derived["cpu_user_pct"] == pytest.approx(25.0)


def test_cpu_per_unit_is_left_out_when_the_count_is_missing() -> None:
    assert workloads.cpu_metrics("churn", {}, user_s=0.0, system_s=0.0, wall_s=0.0) == \
        {"cpu_s": 0.0}


def test_summary_takes_medians_ratios_and_marks_errors() -> None:
    records = [Record(r, "churn", "rawproxy", {"conn_rps": v, "errors": 0.0})
               for r, v in enumerate((5000.0, 6000.0, 9000.0))]
    records += [Record(r, "churn", "haproxy", {"conn_rps": 12_000.0, "errors": 0.0})
                for r in range(3)]
    records.append(Record(0, "churn", "threads", error="threads exited with 1"))
    summary = Summary(records, ["rawproxy", "haproxy", "threads"])
    row = next(r for r in ROWS if r.label == "churn conn/s")
    assert summary.value("rawproxy", row) == 6000.0
    assert summary.ratio("rawproxy", row, "haproxy") == pytest.approx(0.5)
    assert summary.cell("threads", row) == "err"
    table = render_table(summary, ["churn"])
    assert "churn conn/s" in table and "6000" in table and "0.50/-" in table


STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 30.12    0.004000           2      2000           epoll_ctl
 20.00    0.002000           1      4000      2000 accept4
 10.00    0.001000           0      8000           clock_gettime
  0.50    0.000100           0       100           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.007100           0     14100      2000 total
"""


def test_strace_summary_gives_calls_per_connection_without_clock_reads() -> None:
    counts = syscalls.parse_strace_summary(STRACE_SUMMARY)
    assert counts == {"epoll_ctl": 2000, "accept4": 4000, "clock_gettime": 8000, "close": 100}
    per = syscalls.per_connection(counts, 2000)
    assert per["accept4"] == 2.0 and per["clock_gettime"] == 4.0
    assert per["total"] == (2000 + 4000 + 100) / 2000
    table = syscalls.render({"rawproxy": per})
    assert "total (no clock reads)" in table and "clock_gettime (clock)" in table


def test_the_gc_tally_counts_only_while_on_and_by_generation() -> None:
    from benchmarks.hotspots import GcTally

    tally = GcTally()
    tally.on_gc("start", {"generation": 0})
    tally.on_gc("stop", {"generation": 0, "collected": 0})
    assert tally.collections == [0, 0, 0], "off: nothing counted"
    tally.counting = True
    for generation in (0, 0, 2):
        tally.on_gc("start", {"generation": generation})
        tally.on_gc("stop", {"generation": generation, "collected": 1})
    assert tally.collections == [2, 0, 1]
    assert all(seconds >= 0.0 for seconds in tally.seconds)
