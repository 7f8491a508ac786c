"""``pagewarden kvm-check``: a real vCPU on /dev/kvm reads guest pages a Handler serves, some of
them poisoned. Runs where /dev/kvm is usable; skips where it is absent; under
``PAGEWARDEN_REQUIRE_UFFD=1`` a /dev/kvm that is present but unusable is a failure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import PAGE, SIGBUS_CODES, unavailable

import pagewarden as pw
from pagewarden import _native, cli, kvm_check

DATA_BASE = 0x10000
OBSERVATION_KINDS = {"sigbus", "memory_fault_exit", "efault", "mmio_exit"}


def run_check(**kwargs: Any) -> dict[str, Any]:
    """The check, with an UnsupportedError turned into a skip (or a failure when required)."""
    try:
        return kvm_check.check(**kwargs)
    except pw.UnsupportedError as e:
        unavailable(f"/dev/kvm is present but unusable: {e}")
        raise


def assert_sound(report: dict[str, Any], pages: int, poisoned: list[int]) -> None:
    """The facts every run on a working host must show."""
    want_poisoned = [DATA_BASE + i * PAGE for i in poisoned]
    assert report["errors"] == [], report["errors"]
    assert report["vcpu_ran"]
    assert report["guest_completed"], report["stop_reason"]
    assert report["stop_reason"] == "hlt"
    assert report["data_pages"] == pages
    assert report["poisoned_pages"] == want_poisoned
    assert report["pages_checked"] == pages
    assert report["pages_correct"] == report["pages_checked"] - len(want_poisoned)
    assert report["wrong_pages"] == []
    assert report["poison_data_leaks"] == 0
    assert report["poisoned_pages_observed"] == len(want_poisoned)
    # Every observation names a poisoned page, and every poisoned page was observed.
    seen = set()
    for o in report["poison_observed_as"]:
        assert o["how"] in OBSERVATION_KINDS, o
        assert o["poisoned_page"], o
        gpa = o["guest_address"]
        assert gpa is not None
        page = gpa - gpa % PAGE
        assert page in want_poisoned, f"observation at {gpa:#x} outside the poisoned pages"
        assert o["page"] == (page - DATA_BASE) // PAGE
        if o["how"] == "sigbus":
            assert o["si_code"] in SIGBUS_CODES, o
        seen.add(page)
    assert seen == set(want_poisoned)
    assert report["poison_intact_after_run"]
    # No prefetch: the vCPU faulted in every page it read; poison was never copied over.
    handler = report["handler"]
    assert handler["pages_poisoned"] == len(want_poisoned)
    assert handler["faults"] >= pages - len(want_poisoned)
    assert handler["pages_copied"] >= pages - len(want_poisoned)
    assert report["ok"]


def test_a_real_vcpu_never_reads_poison(kvm: None) -> None:
    report = run_check()
    pages = report["data_pages"]
    poisoned = [(gpa - DATA_BASE) // PAGE for gpa in report["poisoned_pages"]]
    assert pages == kvm_check.DEFAULT_PAGES
    assert len(poisoned) >= 1
    assert_sound(report, pages, poisoned)
    mce = report["mce"]
    if mce["delivered"]:
        # The guest's #MC handler read the injected address back from MCi_ADDR.
        assert mce["injected"] == "ok"
        assert mce["guest_mci_addr"] == mce["injected_guest_address"] == report["poisoned_pages"][0]
        assert mce["guest_mcg_status"] is not None and mce["guest_mcg_status"] & 0x4  # MCIP


@pytest.mark.parametrize(
    ("pages", "poisoned"),
    [(16, [0]), (16, [0, 7, 15]), (64, list(range(10, 20)))],
)
def test_chosen_poison(kvm: None, pages: int, poisoned: list[int]) -> None:
    report = run_check(pages=pages, poisoned=poisoned, timeout=20.0)
    assert_sound(report, pages, poisoned)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pages": 8}, "16 to 224 data pages"),
        ({"pages": 300}, "16 to 224 data pages"),
        ({"pages": 16, "poisoned": []}, "at least one"),
        ({"pages": 16, "poisoned": list(range(16))}, "leave one clean"),
        ({"pages": 16, "poisoned": [16]}, "outside"),
        ({"timeout": 0.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
def test_bad_arguments_are_configuration_errors(kwargs: dict[str, Any], match: str) -> None:
    # Validated before /dev/kvm is opened, so this runs everywhere.
    with pytest.raises(pw.ConfigurationError, match=match):
        _native.kvm_check(**kwargs)


def test_cli_json_and_exit_status(kvm: None, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["kvm-check", "--json", "--pages", "16", "--poison", "3,9"])
    out = capsys.readouterr().out
    report = json.loads(out)
    if status != 0 and report.get("error_type") == "UnsupportedError":
        unavailable(f"/dev/kvm is present but unusable: {report['error']}")
    assert status == 0, out
    assert_sound(report, 16, [3, 9])


def test_cli_table(kvm: None, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["kvm-check"])
    out = capsys.readouterr().out
    assert status == 0, out
    for label in ("vCPU ran", "pages correct", "poison data leaks", "poison observed as"):
        assert label in out
    assert out.rstrip().endswith("OK: every clean page right, no poisoned byte reached the guest")


def test_cli_rejects_bad_pages(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kvm-check", "--pages", "8", "--json"]) == 1
    error = json.loads(capsys.readouterr().out)
    assert error["ok"] is False
    assert error["error_type"] == "ConfigurationError"
    with pytest.raises(SystemExit):
        cli.main(["kvm-check", "--poison", "three"])


def _report(**changes: Any) -> dict[str, Any]:
    """A synthetic report, as a host that sends SIGBUS would produce it."""
    report: dict[str, Any] = {
        "ok": True,
        "kernel_release": "6.18",
        "kvm_api_version": 12,
        "memory_fault_info": True,
        "data_pages": 16,
        "vcpu_ran": True,
        "guest_completed": True,
        "stop_reason": "hlt",
        "pages_checked": 16,
        "pages_correct": 15,
        "poisoned_pages": [DATA_BASE],
        "poisoned_pages_observed": 1,
        "poison_data_leaks": 0,
        "wrong_pages": [],
        "poison_observed_as": [
            {
                "how": "sigbus",
                "guest_address": DATA_BASE,
                "page": 0,
                "poisoned_page": True,
                "host_address": 0x7F0000010000,
                "si_code": 4,
                "si_code_name": "BUS_MCEERR_AR",
            }
        ],
        "mce": {
            "supported": True,
            "max_banks": 32,
            "mcg_cap": 0x100010A,
            "setup": "ok",
            "cr4_mce": "ok",
            "injected": "ok",
            "delivered": False,
            "guest_mci_addr": None,
        },
        "poison_intact_after_run": True,
        "exits": {"total": 40},
        "handler": {"faults": 18, "pages_copied": 18, "pages_poisoned": 1},
        "errors": [],
        "elapsed_s": 0.002,
    }
    report.update(changes)
    return report


def test_report_table_names_what_the_vmm_saw() -> None:
    text = kvm_check.format_report(_report())
    assert "SIGBUS BUS_MCEERR_AR (si_code 4) at the host address (1 load)" in text
    assert "injected, but the guest's #MC handler did not run" in text
    failed = kvm_check.format_report(
        _report(
            ok=False,
            poison_data_leaks=1,
            wrong_pages=[{"guest_address": 0x11000, "expected": [1, 2], "got": [0, 0]}],
            errors=["the guest halted before reading every page"],
        )
    )
    assert failed.rstrip().endswith("FAILED")
    assert "wrong page" in failed and "0x11000" in failed
    assert "error" in failed and "halted before" in failed
