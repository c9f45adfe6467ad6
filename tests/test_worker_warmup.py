"""The worker's warm-up before it forks (`service.cli.warm_worker`) covers what an audit
imports: a module an audit imports for the first time is imported again, at its full cost,
by every work-horse the worker forks. The one exception is onnxruntime, which starts a thread
on import (see `warm_worker`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.planted.audits import staged_audit
from tests.planted.models import TINY_ARCH, TINY_ARGS, tiny_vit
from tests.test_onnx import export
from tests.test_onnx import stage_audit as stage_onnx_audit
from workers.audit_common import RUN_ORDER

REPO = Path(__file__).resolve().parents[1]

# A fresh process that warms up as the worker does, then audits the staged folder with every
# section and prints the modules the audit imported. Only the standard library, torch and
# service.cli are imported before the snapshot, so nothing the test staged counts as warm.
AUDIT_AFTER_WARM_UP = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from service.cli import warm_worker
warm_worker()
before = set(sys.modules)
from workers.pipeline import run_pipeline
root = Path(sys.argv[1])
report = run_pipeline(json.loads((root / "request.json").read_text()), root).report
sections = {name: report[name].get("available") for name in sys.argv[2:]}
print(json.dumps({"new": sorted(set(sys.modules) - before), "sections": sections}))
"""


def _staged(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """A staged audit folder with its request.json, and the sections it asks for."""
    if kind == "torch":
        analyses = list(RUN_ORDER)
        request, root = staged_audit(tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS, analyses=analyses)
    else:
        analyses = ["position_embedding", "heads"]  # gradients need the PyTorch weights
        model = export(tiny_vit(), tmp_path / "tiny.onnx", fused=False)
        request, root = stage_onnx_audit(tmp_path / "audit", model, analyses=analyses)
    (root / "request.json").write_text(json.dumps(request))
    return root, analyses


@pytest.mark.parametrize(("kind", "allowed"), [("torch", ()), ("onnx", ("onnxruntime",))])
def test_an_audit_after_the_worker_warm_up_imports_nothing_new(
    tmp_path: Path, kind: str, allowed: tuple[str, ...]
) -> None:
    root, analyses = _staged(kind, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", AUDIT_AFTER_WARM_UP, str(root), *analyses],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # every section ran (one that failed early could leave its imports out)
    assert result["sections"] == {name: True for name in analyses}
    new = [m for m in result["new"] if m.split(".")[0] not in allowed]
    assert new == [], "add these to service.cli.WARM_MODULES"
    if allowed:  # the exception is real: the audit did import it
        assert any(m.split(".")[0] in allowed for m in result["new"])
