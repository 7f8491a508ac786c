"""The remote post-copy section of ``pagewarden bench`` in its smallest configuration: the
structure of what it reports, never its speed (figures are goals, reported as ratios)."""

from __future__ import annotations

import dataclasses

import pytest

from pagewarden import bench

pytestmark = pytest.mark.usefixtures("uffd")


def test_remote_section_reports_every_figure() -> None:
    config = dataclasses.replace(
        bench.Config.make(quick=True, repetitions=1), remote_bytes=16 << 20, remote_touches=64
    )
    report = bench.Report(machine=bench._machine(), config=dataclasses.asdict(config))
    bench.run_sections(config, report, {"remote"})
    remote = report.remote
    assert remote["bytes"] == 16 << 20
    assert set(remote["throughput_mib_s"]) == {
        "raw TCP",
        "raw TCP + UFFDIO_COPY",
        "raw TCP + shmem write + CONTINUE",
        "push random",
        "push random, MINOR shmem",
        "push half-zero",
        "push random, plaintext",
        "push random, TLS",
    }
    assert all(v > 0 for v in remote["throughput_mib_s"].values())
    # The random image is incompressible: every byte crosses the wire; half the other is zero.
    assert remote["bytes_received"]["push random"] == 16 << 20
    assert remote["bytes_received"]["push random, MINOR shmem"] == 16 << 20
    assert remote["bytes_received"]["push half-zero"] == 8 << 20
    # The same bytes whatever protects them.
    assert remote["bytes_received"]["push random, plaintext"] == 16 << 20
    assert remote["bytes_received"]["push random, TLS"] == 16 << 20
    assert set(remote["latency"]) == set(bench.REMOTE_LATENCY_NAMES)
    idle = remote["latency"]["idle"]
    assert idle["samples"] == 64 and idle["faults"] == [64]
    assert 0 < idle["p50_us"] <= idle["p99_us"]
    for name in bench.REMOTE_LATENCY_NAMES:
        x = remote["latency"][name]
        assert x["samples"] == sum(x["touches"]) == sum(x["histogram_log2_us"])
        assert x["p50_us"] <= x["p99_us"]
        assert len(x["handler_histogram_log2_us"]) == 24
        assert len(x["p99_runs_us"]) == len(x["touches"])
    for name in bench.REMOTE_LATENCY_NAMES[1:]:
        push_s = remote["latency"][name]["push_s"]
        assert len(push_s) == 1 and push_s[0] > 0
    assert remote["server_summary"].startswith("served ")
    bench.evaluate_targets(report)
    # Push vs raw TCP (3: anonymous random and half-zero, MINOR shmem), encrypted push vs raw
    # TCP (2), encrypted p99 vs plaintext (2), p99 under push vs idle (pooled, and the worst
    # repetition), the urgent channel.
    seq = remote["sequential"]
    assert set(seq) == {"idle", "one CPU busy"}
    for x in seq.values():
        assert x["pages"] == (16 << 20) // 4096
        assert x["push_s"] > 0 and x["reader_total_s"] > 0
        assert 0 <= x["faults"] <= x["pages"] * 2
    # ... and the sequential reader's two per host.
    assert sum(t["target"].startswith("remote ") for t in report.targets) == 14
    text = bench.render(report)
    assert "Remote post-copy over loopback TCP" in text and "no urgent channel" in text
    assert "kernel bound, anon" in text and "kernel bound, MINOR" in text
    minor = next(t for t in report.targets if "MINOR shmem / raw TCP" in t["target"])
    assert "the kernel's share alone" in minor["note"]


@pytest.mark.parametrize("place", ["none", "copy", "minor"])
def test_raw_stream_places_what_it_receives(place: str) -> None:
    # The kernel-bound rows: the raw stream's receiver puts every chunk into memory.
    from pagewarden import _native

    seconds = _native._bench_tcp_stream(4 << 20, 256 << 10, place=place)
    assert seconds > 0


def test_raw_stream_rejects_bad_placement() -> None:
    import pagewarden as pw
    from pagewarden import _native

    with pytest.raises(pw.ConfigurationError, match="place must be"):
        _native._bench_tcp_stream(1 << 20, 4096, place="sideways")
    with pytest.raises(pw.ConfigurationError, match="multiples of 4096"):
        _native._bench_tcp_stream(1 << 20, 1000, place="copy")
