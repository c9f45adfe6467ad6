"""Report assembly: the contract every report keeps (see DESIGN.md, "Report contract")."""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from workers.report_schema import SCHEMA_VERSION

SECTIONS = ("position_embedding", "heads", "gradients", "qk_geometry")


def package_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "vitaudit": version("vitaudit"),
        "torch": version("torch"),
        "timm": version("timm"),
        "onnxruntime": version("onnxruntime-gpu") or version("onnxruntime"),
    }


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts: NaN/inf -> None, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())
    return value


def assemble_report(
    *,
    model: dict[str, Any],
    settings: dict[str, Any],
    sections: dict[str, dict[str, Any]],
    timings: dict[str, float],
    notes: list[str],
) -> dict[str, Any]:
    """The report dict: every contract section present, absent analyses marked unavailable."""
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "settings": settings,
    }
    for name in SECTIONS:
        report[name] = sections.get(name) or {
            "available": False,
            "reason": "not requested in options.analyses",
        }
    report["notes"] = notes
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    report["versions"] = package_versions()
    return json_safe(report)
