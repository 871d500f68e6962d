"""The node_exporter textfile (SPEC "systemd and journald", ``[metrics] textfile``)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubecertd.diagnose import CODES, CheckPolicy, Diagnosis, diagnose
from kubecertd.edges.textfile import AgentCounters, render, write
from kubecertd.material import read_material

from factories import NODE, NOW, OTHER_NODE, issue, make_ca, write_ssl_dir

CHECKED_AT = 1_780_000_000.25
SPEC_SAMPLES = {
    "kubecertd_certificate_not_after_seconds": "gauge",
    "kubecertd_healthy": "gauge",
    "kubecertd_findings": "gauge",
    "kubecertd_renewals_total": "counter",
    "kubecertd_kubelet_restarts_total": "counter",
    "kubecertd_last_check_timestamp_seconds": "gauge",
}
POLICY = CheckPolicy(warn_fraction=0.8, key_owners=frozenset({0, os.geteuid()}))
ODD_NOT_AFTER = dt.datetime(2027, 1, 1, 12, 34, 56, tzinfo=dt.timezone.utc)


def diagnosis_of(directory: Path, node: str = NODE, key_mode: int = 0o600) -> Diagnosis:
    """The real diagnosis of an ssl directory holding a fresh CA and a certificate for ``node``."""
    ca = make_ca()
    leaf = issue(ca, cn_list=(f"system:node:{node}",), not_after=ODD_NOT_AFTER)
    paths = write_ssl_dir(directory, ca.pem, leaf.pem, leaf.key_pem, key_mode=key_mode)
    return diagnose(read_material(*paths), NODE, NOW, POLICY)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a textfile, keyed by name and sorted labels, parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    return found


def text_of(diagnosis: Diagnosis, counters: AgentCounters | None = None) -> str:
    return generate_latest(render(diagnosis, counters or AgentCounters(), CHECKED_AT)).decode()


@pytest.fixture
def healthy(tmp_path: Path) -> Diagnosis:
    """The diagnosis of a complete, healthy ssl directory for NODE."""
    diagnosis = diagnosis_of(tmp_path / "healthy")
    assert diagnosis.healthy and not diagnosis.findings
    return diagnosis


@pytest.fixture
def unhealthy(tmp_path: Path) -> Diagnosis:
    """The diagnosis of another node's certificate with a world-readable key."""
    diagnosis = diagnosis_of(tmp_path / "copied", node=OTHER_NODE, key_mode=0o644)
    assert sorted(diagnosis.codes) == ["cert-wrong-node", "key-permissions"]
    return diagnosis


def test_textfile_has_spec_metric_names_and_types(healthy: Diagnosis) -> None:
    """The textfile holds SPEC's six metrics with their types and no *_created series."""
    families = {f.name: f.type for f in text_string_to_metric_families(text_of(healthy))}
    sample_names = {name for name, _ in samples(text_of(healthy))}
    assert sample_names == set(SPEC_SAMPLES)
    for name, kind in SPEC_SAMPLES.items():
        assert families[name.removesuffix("_total")] == kind, name


def test_textfile_values_of_a_healthy_diagnosis(healthy: Diagnosis) -> None:
    """A healthy diagnosis: notAfter to the second, healthy 1, every finding 0, counters and check time."""
    counters = AgentCounters(renewals={"success": 3, "failure": 2}, kubelet_restarts=4)
    values = samples(text_of(healthy, counters))
    assert values[("kubecertd_certificate_not_after_seconds", ())] == ODD_NOT_AFTER.timestamp()
    assert values[("kubecertd_healthy", ())] == 1.0
    assert values[("kubecertd_renewals_total", (("result", "success"),))] == 3.0
    assert values[("kubecertd_renewals_total", (("result", "failure"),))] == 2.0
    assert values[("kubecertd_kubelet_restarts_total", ())] == 4.0
    assert values[("kubecertd_last_check_timestamp_seconds", ())] == CHECKED_AT
    findings = {labels[0][1]: v for (n, labels), v in values.items() if n == "kubecertd_findings"}
    assert findings == dict.fromkeys(CODES, 0.0)


def test_textfile_values_of_an_unhealthy_diagnosis(unhealthy: Diagnosis) -> None:
    """Another node's certificate: healthy 0, one series per SPEC code, 1 for each code found."""
    values = samples(text_of(unhealthy))
    assert values[("kubecertd_healthy", ())] == 0.0
    findings = {labels[0][1]: v for (n, labels), v in values.items() if n == "kubecertd_findings"}
    assert set(findings) == set(CODES)
    assert {code for code, v in findings.items() if v} == {"cert-wrong-node", "key-permissions"}
    assert findings["cert-wrong-node"] == findings["key-permissions"] == 1.0
    assert values[("kubecertd_certificate_not_after_seconds", ())] == ODD_NOT_AFTER.timestamp()


def test_textfile_without_a_certificate(tmp_path: Path) -> None:
    """With no readable certificate notAfter is 0, healthy 0 and cert-missing 1."""
    ca = make_ca()
    paths = write_ssl_dir(tmp_path / "ssl", ca.pem, None, None)
    diagnosis = diagnose(read_material(*paths), NODE, NOW, POLICY)
    values = samples(text_of(diagnosis))
    assert values[("kubecertd_certificate_not_after_seconds", ())] == 0.0
    assert values[("kubecertd_healthy", ())] == 0.0
    assert values[("kubecertd_findings", (("code", "cert-missing"),))] == 1.0
    assert values[("kubecertd_findings", (("code", "key-missing"),))] == 1.0


def test_textfile_counts_repeated_codes(unhealthy: Diagnosis) -> None:
    """A code found twice in one diagnosis is counted 2."""
    twice = unhealthy._replace(findings=unhealthy.findings + unhealthy.findings[:1])
    code = unhealthy.findings[0].code
    assert samples(text_of(twice))[("kubecertd_findings", (("code", code),))] == 2.0


def test_write_creates_the_directory_and_the_file(tmp_path: Path, healthy: Diagnosis) -> None:
    """write() creates a missing directory and writes exactly what render() produces, with no leftovers."""
    path = tmp_path / "textfile_collector" / "kubecertd.prom"
    write(str(path), healthy, AgentCounters(), CHECKED_AT)
    assert path.read_text() == text_of(healthy)
    assert os.listdir(path.parent) == ["kubecertd.prom"]


def test_write_replaces_the_file_by_rename(
    tmp_path: Path, healthy: Diagnosis, unhealthy: Diagnosis
) -> None:
    """Each write() puts a new inode in place, so a reader holding the old file keeps a whole old copy."""
    path = tmp_path / "kubecertd.prom"
    write(str(path), healthy, AgentCounters(), CHECKED_AT)
    before = os.stat(path).st_ino
    with open(path, encoding="utf-8") as held:
        write(str(path), unhealthy, AgentCounters(), CHECKED_AT)
        assert held.read() == text_of(healthy)
    assert os.stat(path).st_ino != before
    assert path.read_text() == text_of(unhealthy)


def test_reader_never_sees_a_partial_textfile(
    tmp_path: Path, healthy: Diagnosis, unhealthy: Diagnosis
) -> None:
    """While write() rewrites the file 200 times, a concurrent reader only ever sees one whole version."""
    path = tmp_path / "metrics" / "kubecertd.prom"
    versions = [
        (healthy, AgentCounters()),
        (unhealthy, AgentCounters({"success": 7, "failure": 1}, 2)),
    ]
    whole = {text_of(d, c) for d, c in versions}
    write(str(path), *versions[0], CHECKED_AT)
    done = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        deadline = (
            time.monotonic() + 30
        )  # bound: the writer normally finishes in well under a second
        while not done.is_set() and time.monotonic() < deadline:
            with open(path, encoding="utf-8") as stream:
                seen.append(stream.read())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            write(str(path), *versions[i % 2], CHECKED_AT)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert seen, "the reader never ran"
    partial = [text for text in seen if text not in whole]
    assert partial == [], f"{len(partial)} of {len(seen)} reads saw a partial file"
    assert os.listdir(path.parent) == ["kubecertd.prom"]


def test_textfile_is_world_readable_under_the_service_umask(
    tmp_path: Path, healthy: Diagnosis
) -> None:
    """Under the unit's UMask=0077 the textfile is still 0644, readable by node_exporter's user."""
    path = tmp_path / "kubecertd.prom"
    old = os.umask(0o077)
    try:
        write(str(path), healthy, AgentCounters(), CHECKED_AT)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
