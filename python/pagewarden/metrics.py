"""Prometheus metrics for pagewarden handlers (``pip install pagewarden[metrics]``).

``HandlerCollector`` reads ``Handler.stats()`` at scrape time, so nothing is added to the fault
path: counters become ``pagewarden_<name>_total`` with a ``vm`` label, page counts a gauge by
state, and the log2 latency histogram a Prometheus histogram in seconds.

    from prometheus_client import start_http_server
    import pagewarden.metrics
    pagewarden.metrics.register({"vm1": handler})
    start_http_server(9100)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pagewarden.metrics needs prometheus-client: pip install 'pagewarden[metrics]'"
    ) from e

import pagewarden as pw

#: Counters of ``Handler.stats()`` exported as ``pagewarden_<name>_total``, with their help text.
COUNTERS: dict[str, str] = {
    "faults": "Fault messages handled.",
    "pages_copied": "Pages filled with source bytes (by faults and by prefetch).",
    "pages_zeroed": "Pages filled with zeros.",
    "pages_poisoned": "Poison markers installed (again after every removal).",
    "pages_prefetched": "Pages brought in by background prefetch.",
    "pages_prefetched_planned": "Pages brought in first by the given prefetch order.",
    "prefetch_jumps": "Times the background stream moved to where the guest faulted.",
    "pages_poisoned_runtime": "Pages poisoned while the VM ran.",
    "pages_fenced": "Pages fenced by fail-stop (not hardware poison).",
    "eexist": "Resolutions that found the page already mapped.",
    "eagain_retries": "Resolutions retried because an event was pending.",
    "remove_events": "MADV_DONTNEED / MADV_REMOVE notifications.",
    "unmap_events": "munmap notifications.",
    "remap_events": "mremap notifications.",
    "unknown_faults": "Faults outside every region.",
    "pages_poisoned_source": "Pages a remote source reported poisoned after the start.",
    "pages_poisoned_policy": "Pages a policy decided to poison.",
    # Present only with a policy (Handler(..., policy=...)); exported as 0 otherwise.
    "policy_faults": "Faults handed to the policy's on_fault.",
    "policy_source_errors": "Source errors handed to the policy's on_source_error.",
    "policy_timeouts": "Policy decisions that missed policy_timeout (native default applied).",
    "policy_late_answers": "Policy answers that arrived after their deadline and were dropped.",
    "policy_notices_dropped": "Policy notifications dropped because the dispatcher fell behind.",
}


class HandlerCollector(Collector):
    """Exports the stats of one or more handlers, labelled ``vm`` (or ``label``).

    ``handlers`` is a Handler (named ``vm``), a mapping of names to handlers (copied), or a
    function that returns the current mapping at every scrape (a daemon whose VMs come and go).
    """

    def __init__(
        self,
        handlers: Mapping[str, pw.Handler] | pw.Handler | Callable[[], Mapping[str, pw.Handler]],
        vm: str = "vm",
        label: str = "vm",
    ) -> None:
        self.label = label
        self._source: Callable[[], Mapping[str, pw.Handler]] | None = None
        self.handlers: dict[str, pw.Handler] = {}
        if isinstance(handlers, pw.Handler):
            self.handlers = {vm: handlers}
        elif callable(handlers):
            self._source = handlers
        else:
            self.handlers = dict(handlers)

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at scrape time."""
        handlers = self.handlers if self._source is None else self._source()
        stats: dict[str, dict[str, Any]] = {}
        for vm, h in handlers.items():
            try:
                stats[vm] = h.stats()
            except pw.PagewardenError:
                continue  # closed between the listing and the scrape
        label = self.label
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"pagewarden_{name}", help_text, labels=[label])
            for vm, st in stats.items():
                family.add_metric([vm], float(st.get(name, 0)))
            yield family
        pages = GaugeMetricFamily(
            "pagewarden_pages", "Guest pages by state.", labels=[label, "state"]
        )
        for vm, st in stats.items():
            pages.add_metric([vm, "total"], float(st["pages_total"]))
            pages.add_metric([vm, "resolved"], float(st["pages_resolved"]))
            pages.add_metric([vm, "missing"], float(st["pages_missing"]))
        yield pages
        latency = HistogramMetricFamily(
            "pagewarden_fault_latency_seconds",
            "Fault latency, from reading the message to the resolving ioctl's return.",
            labels=[label],
        )
        for vm, st in stats.items():
            buckets: list[tuple[str, float]] = []
            seen = 0
            for i, count in enumerate(st["latency_dist_us_log2"]):
                seen += count
                buckets.append((repr((2 ** (i + 1)) / 1e6), float(seen)))
            buckets.append(("+Inf", float(seen)))
            latency.add_metric([vm], buckets, sum_value=st["latency_ns_total"] / 1e9)
        yield latency


def register(
    handlers: Mapping[str, pw.Handler] | pw.Handler,
    vm: str = "vm",
    registry: CollectorRegistry = REGISTRY,
) -> HandlerCollector:
    """Registers a collector for ``handlers`` (a Handler, or a mapping of VM names to
    handlers) with ``registry`` (the default one unless given); returns it so that it can be
    unregistered with ``registry.unregister``."""
    collector = HandlerCollector(handlers, vm)
    registry.register(collector)
    return collector
