"""The shipped Prometheus alert rules (packaging/kubecertd-alerts.yml), through promtool.

The cases themselves are promtool unit tests in tests/alerts/kubecertd-alerts.test.yml;
promtool comes with Debian's ``prometheus`` package, which ``make venv`` installs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "kubecertd-alerts.yml"
RULE_TESTS = ROOT / "tests" / "alerts" / "kubecertd-alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs promtool; a missing promtool fails the test, since `make test` installs it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install Debian's prometheus package "
            "(tools/ensure-debian-packages prometheus, or make venv as root)"
        )
    return subprocess.run([path, *args], capture_output=True, text=True, check=False, timeout=120)


def test_rules_file_is_valid() -> None:
    """promtool check rules accepts the shipped rules file."""
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_unit_tests() -> None:
    """Each alert fires and stays silent with the exact annotations the promtool tests expect."""
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests() -> None:
    """Every alert in the rules file is named by the promtool unit tests."""
    alerts = set(re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE))
    tested = set(re.findall(r"^\s*alertname: (\w+)\s*$", RULE_TESTS.read_text(), re.MULTILINE))
    assert alerts, f"no alerts found in {RULES}"
    assert alerts <= tested, f"alerts without promtool tests: {sorted(alerts - tested)}"
