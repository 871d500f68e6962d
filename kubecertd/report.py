"""Rendering a ``Diagnosis`` for people (``--check``) and for scripts (``--json``)."""

from __future__ import annotations

from .diagnose import ERROR, Diagnosis, Finding

_INDENT = " " * 4


def render_json(diagnosis: Diagnosis) -> str:
    import json  # noqa: PLC0415 - only --json pays for it

    return json.dumps(diagnosis.to_dict(), indent=2)


def render_text(diagnosis: Diagnosis) -> str:
    """One block per file (what it is, its facts, its findings with hints), then a verdict."""
    lines = [
        f"kubecertd check of node {diagnosis.node} at {diagnosis.now:%Y-%m-%d %H:%M:%S} UTC",
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
        lines.append("")
    for leftover in by_path.values():  # findings on a path none of the blocks shows
        lines.extend(_finding_lines(leftover))
    lines.append(_verdict(diagnosis))
    return "\n".join(lines)


def _finding_lines(findings: list[Finding]) -> list[str]:
    lines = []
    for item in findings:
        lines.append(f"{_INDENT}{item.severity.upper():<7}  {item.code}: {item.message}")
        lines.append(f"{_INDENT}{'':<7}  hint: {item.hint}")
    return lines


def _verdict(diagnosis: Diagnosis) -> str:
    errors = sum(1 for f in diagnosis.findings if f.severity == ERROR)
    warnings = len(diagnosis.findings) - errors
    counts = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    if not diagnosis.healthy:
        return f"UNHEALTHY ({counts}): kubelet cannot use these files as they are; kubecertd --check --fix heals them"
    summary = diagnosis.certificate_summary()
    until = f", certificate valid until {summary['not_after']}" if summary else ""
    return f"HEALTHY ({counts}){until}"
