"""Rendering a ``Diagnosis`` for people (``--check``) and for scripts (``--json``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .diagnose import ERROR, WARNING, Diagnosis, Finding

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .culprit import Culprit
    from .errors import KubecertdError
    from .layout import Layout
    from .oneshot import FixReport

_INDENT = " " * 4


def render_json(
    diagnosis: Diagnosis,
    layout: Layout,
    fix: FixReport | None = None,
    changes: Mapping[str, Culprit] | None = None,
) -> str:
    """SPEC's ``--check --json`` object; with ``--fix``, its ``fix`` object too."""
    document = diagnosis.to_dict()
    document["layout"] = layout.to_dict()
    document["changes"] = [
        {"path": path, "message": record.describe(diagnosis.now), **record.to_dict()}
        for path, record in (changes or {}).items()
    ]
    if fix is not None:
        document["fix"] = fix.to_dict()
    return _dumps(document)


def render_json_error(error: KubecertdError) -> str:
    """The object a ``--json`` run prints when it could not diagnose at all (exit 2)."""
    document: dict[str, Any] = {"node": None, "healthy": None, "findings": [], "certificate": None}
    document["layout"] = None
    document["error"] = {"code": error.code, "message": str(error)}
    return _dumps(document)


def _dumps(document: dict[str, Any]) -> str:
    import json  # noqa: PLC0415 - only --json pays for it

    return json.dumps(document, indent=2)


def render_text(
    diagnosis: Diagnosis,
    layout: Layout,
    fix: FixReport | None = None,
    changes: Mapping[str, Culprit] | None = None,
) -> str:
    """One block per file (what it is, its facts, its findings with hints), what ``--fix``
    did, then a verdict."""
    lines = [
        f"kubecertd check of node {diagnosis.node} at {diagnosis.now:%Y-%m-%d %H:%M:%S} UTC",
        f"layout: {layout.name} ({layout.shape}), kubelet runs in {layout.unit}"
        + (f", kubeconfig {layout.kubeconfig}" if layout.kubeconfig else ""),
        f"{_INDENT}found from {'; '.join(layout.found_from)}",
        "",
    ]
    by_path: dict[str, list[Finding]] = {}
    for item in diagnosis.findings:
        by_path.setdefault(item.path, []).append(item)
    for report in diagnosis.files:
        lines.append(f"{report.role}: {report.path}")
        for label, value in report.facts:
            lines.append(f"{_INDENT}{label:<8} {value}")
        found = by_path.pop(report.path, [])
        lines.extend(_finding_lines(found) if found else [f"{_INDENT}ok"])
        change = (changes or {}).get(report.path)
        if change is not None:
            lines.append(f"{_INDENT}last change: {change.describe(diagnosis.now)}")
        lines.append("")
    for leftover in by_path.values():  # findings on a path none of the blocks shows
        lines.extend(_finding_lines(leftover))
    if fix is not None:
        lines.extend([_fix_line(fix), ""])
    lines.append(_verdict(diagnosis))
    return "\n".join(lines)


def _finding_lines(findings: list[Finding]) -> list[str]:
    lines = []
    for item in findings:
        lines.append(f"{_INDENT}{item.severity.upper():<7}  {item.code}: {item.message}")
        lines.append(f"{_INDENT}{'':<7}  hint: {item.hint}")
        if item.kubelet_line:
            lines.append(f"{_INDENT}{'':<7}  kubelet: {item.kubelet_line}")
    return lines


def _verdict(diagnosis: Diagnosis) -> str:
    errors = sum(1 for f in diagnosis.findings if f.severity == ERROR)
    warnings = sum(1 for f in diagnosis.findings if f.severity == WARNING)
    counts = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    if not diagnosis.healthy:
        return f"UNHEALTHY ({counts}): kubelet cannot use these files as they are; kubecertd --check --fix heals them"
    summary = diagnosis.certificate_summary()
    until = f", certificate valid until {summary['not_after']}" if summary else ""
    return f"HEALTHY ({counts}){until}"


def _fix_line(fix: FixReport) -> str:
    tries = f"{fix.tries} tr{'ies' if fix.tries != 1 else 'y'}"
    if fix.error is not None:
        if fix.reason is None:  # it never got as far as deciding (another kubecertd runs)
            return f"fix: not attempted ({fix.error.code}): {fix.error}"
        return (
            f"fix: failed for {fix.reason} after {tries} ({fix.error.code}): {fix.error}; "
            "the files are as they were"
        )
    outcome = fix.outcome
    if outcome is None:
        return "fix: nothing to heal"
    written = ", ".join(outcome.installed)
    restart = {True: "; kubelet restarted", False: "; kubelet did not come back", None: ""}
    if outcome.rolled_back:
        return f"fix: certificate {outcome.serial} rolled back ({fix.reason}); kubelet did not come back with it; restored {written}"
    return f"fix: healed {fix.reason} in {tries}: wrote {written} (certificate {outcome.serial}, valid until {outcome.not_after:%Y-%m-%dT%H:%M:%SZ}){restart[outcome.restarted]}"
