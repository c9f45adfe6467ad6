"""The worker's warm-up before it forks (`service.cli.warm_worker`) covers what an audit
imports: a module an audit imports for the first time is imported again, at its full cost,
by every work-horse the worker forks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.planted.audits import staged_audit
from tests.planted.models import TINY_ARCH, TINY_ARGS, tiny_vit
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


def test_an_audit_after_the_worker_warm_up_imports_nothing_new(tmp_path: Path) -> None:
    request, root = staged_audit(
        tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS, analyses=list(RUN_ORDER)
    )
    (root / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, "-c", AUDIT_AFTER_WARM_UP, str(root), *RUN_ORDER],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # every section ran (one that failed early could leave its imports out)
    assert result["sections"] == {name: True for name in RUN_ORDER}
    assert result["new"] == [], "add these to service.cli.WARM_MODULES"
