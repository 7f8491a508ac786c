"""The Prometheus collector exports what Handler.stats() says."""

from __future__ import annotations

from conftest import PAGE, make_image, settled_stats
from prometheus_client import CollectorRegistry, generate_latest

import pagewarden as pw
import pagewarden.metrics


def test_collector_exports_the_stats(uffd: None) -> None:
    image = make_image(64 * PAGE, seed=71)
    mem = pw.GuestMemory.anonymous(64 * PAGE)
    registry = CollectorRegistry()
    with pw.Handler(
        mem, pw.MemorySource(image), poison=pw.PoisonSet([PAGE]), prefetch=False, fault_around=0
    ) as h:
        pagewarden.metrics.register({"vm-a": h}, registry=registry)
        h.start()
        mem.touch(pages=[0, PAGE, 2 * PAGE, 3 * PAGE])

        def resolved_and_timed(st: dict[str, object]) -> None:
            # The last fault's latency is recorded just after its thread was woken.
            assert sum(st["latency_dist_us_log2"]) == 3  # type: ignore[call-overload]

        st = settled_stats(h, resolved_and_timed)
        value = registry.get_sample_value
        assert (
            value("pagewarden_faults_total", {"vm": "vm-a"}) == st["faults"] == 3
        )  # the poisoned page never faults
        assert value("pagewarden_pages_copied_total", {"vm": "vm-a"}) == st["pages_copied"]
        assert value("pagewarden_pages_poisoned_total", {"vm": "vm-a"}) == st["pages_poisoned"]
        assert value("pagewarden_pages", {"vm": "vm-a", "state": "total"}) == 64
        count = value("pagewarden_fault_latency_seconds_count", {"vm": "vm-a"})
        assert count == sum(st["latency_dist_us_log2"]) > 0
        assert (
            value("pagewarden_fault_latency_seconds_bucket", {"vm": "vm-a", "le": "+Inf"}) == count
        )
        total = value("pagewarden_fault_latency_seconds_sum", {"vm": "vm-a"})
        assert total is not None and abs(total - st["latency_ns_total"] / 1e9) < 1e-3
        text = generate_latest(registry).decode()
        assert 'pagewarden_faults_total{vm="vm-a"}' in text
        assert "# TYPE pagewarden_fault_latency_seconds histogram" in text


def test_collector_exports_policy_counters(uffd: None) -> None:
    mem = pw.GuestMemory.anonymous(16 * PAGE)

    class PoisonThird(pw.Policy):
        def on_fault(self, fault: pw.Fault) -> pw.Action | None:
            return pw.Action.POISON if fault.guest_address == 2 * PAGE else None

    registry = CollectorRegistry()
    with pw.Handler(mem, pw.ZeroSource(), prefetch=False, policy=PoisonThird()) as h:
        pagewarden.metrics.register({"vm-p": h}, registry=registry)
        h.start()
        assert mem.touch(pages=[0, PAGE, 2 * PAGE]).poisoned == [2 * PAGE]
        value = registry.get_sample_value
        assert value("pagewarden_policy_faults_total", {"vm": "vm-p"}) == 3
        assert value("pagewarden_pages_poisoned_policy_total", {"vm": "vm-p"}) == 1
        assert value("pagewarden_policy_timeouts_total", {"vm": "vm-p"}) == 0
