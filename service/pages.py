"""HTML pages for people: the landing page (recent audits, a submit form) and one
self-contained report page per audit.

The report page embeds its plots as ``data:`` URIs and carries its own CSS, so it loads
with no other request and still works when saved to a file. Everything that comes from a
report or a request is escaped by Jinja2's autoescape; the view model (headline rows,
figure captions) is built here by pure functions that the tests call directly.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.datastructures import Cookie, State
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery
from litestar.response import Redirect

from service.audits import finished_report, owned_record, recent_states
from service.auth import (
    SECURE_SESSION_COOKIE,
    SESSION_COOKIE,
    check_same_origin,
    hash_key,
    is_https,
    sends_header_key,
    session_cookie_name,
    tenant_for_key,
)
from service.queue import AuditQueue
from service.sessions import SESSION_TTL_S, open_session, revoke_session
from service.settings import Settings
from service.store import ArtifactStore

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)

# Display-only verdict bands; the numbers are always shown beside them, and a policy (not
# these bands) is what gates CI. 0.6 is the grid-score threshold of the policy examples
# (2-D sin-cos tables score 0.95 to 1, a 1-D raster table about 0.5); 0.2 separates "some
# structure" from the ~0 of random and shuffled tables.
GRID_SCORE_MAP = 0.6
GRID_SCORE_PARTIAL = 0.2
# A metric counts as above chance when it beats its baseline by this much (a tenth of the
# distance from chance to perfect for recall lift and R^2, on the same 0..1 scale).
CHANCE_MARGIN = 0.1
RECENT_AUDITS = 50

# Known figures in reading order: (section, title, what to look for). Figures not listed
# here are still shown, after these, under their file name.
FIGURES: dict[str, tuple[str, str, str]] = {
    "pos_similarity_grid": (
        "position_embedding",
        "Similarity of each patch's embedding to every other patch",
        "Each tile is one patch: look for a bright spot at the tile's own place that fades "
        "smoothly with distance, which means the table is a map of the grid.",
    ),
    "pos_similarity_profile": (
        "position_embedding",
        "Similarity against grid distance",
        "A curve that falls with distance and leaves the shuffled-position band means nearby "
        "patches have similar embeddings; a curve inside the band means no spatial order.",
    ),
    "pos_projection": (
        "position_embedding",
        "2-D projection of the embeddings, by row and by column",
        "A learned 2-D map shows smooth colour gradients along two directions and an "
        "untangled mesh; a random table shows a tangle.",
    ),
    "head_distance_vs_depth": (
        "heads",
        "Mean attention distance per head against depth",
        "Dots far below the dashed uniform-attention line are local heads; expect them in "
        "early layers and heads near the line (global) deeper.",
    ),
    "head_label_map": (
        "heads",
        "Label of every head",
        "Where each label's heads sit, layer by layer; hatched: the label holds in fewer "
        "than 80 % of bootstrap resamples.",
    ),
    "head_attention_maps": (
        "heads",
        "Attention maps of chosen heads on one probe image",
        "A local head lights up around the boxed query patch; a global head spreads its "
        "attention over the whole image.",
    ),
    "gradient_logit_pressure": (
        "gradients",
        "Logit pressure -dL/ds against grid distance, per layer",
        "One row per layer, the head mean per distance bin, each row scaled by its largest "
        "value. The textbook story holds in a row that is red in the near bins and blue in "
        "the far ones (the loss raises neighbours' attention logits).",
    ),
    "gradient_pos_pressure": (
        "gradients",
        "Position-embedding pressure against distance",
        "Positive at short distance and negative far away means one gradient step pulls "
        "neighbouring embeddings together and pushes distant ones apart.",
    ),
    "qk_positional_kernels": (
        "qk_geometry",
        "Positional kernel of every head: the logit from position alone against the offset",
        "One row per layer, one tile per head; the dot is the query, red keys get higher logits "
        "from position alone (content held at its mean). A red spot at the dot is a local head, a "
        "red horizontal band a horizontal one; a flat tile means position does not steer the head.",
    ),
    "qk_alignment_profile": (
        "qk_geometry",
        "Cosine between queries and keys against grid distance",
        "A line above the dashed shuffled-position baseline at short distance means a patch's "
        "query points like its neighbours' keys; smooth images can do this through content alone, "
        "which the positional kernel and alignment_source tell apart.",
    ),
    "trajectory": (
        "trajectory",
        "Headline numbers against the training step",
        "Watch when the grid structure and the local heads appear during training.",
    ),
}
SECTION_TITLES = {
    "position_embedding": "Position embedding",
    "heads": "Head specialization",
    "gradients": "Gradient alignment",
    "qk_geometry": "Q/K geometry",
    "trajectory": "Training trajectory",
    "other": "Other figures",
}


def fmt(value: Any, digits: int = 3) -> str:
    """How a report value is shown: ``digits`` significant digits for floats, 'n/a' for None."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def lookup(report: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of the report, or None when any part is missing."""
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Headline:
    """One row of the headline table: a report number, its baseline and a verdict."""

    metric: str  # dotted path in report.json
    label: str
    value: Any
    baseline_text: str
    baseline_metric: str | None
    baseline: Any
    verdict: str
    tone: str  # "good", "bad" or "neutral"
    digits: int = 3  # significant digits shown (checks near 1 need more to say anything)

    @property
    def shown(self) -> str:
        return fmt(self.value, self.digits)

    @property
    def exact(self) -> str:
        """The value as JSON writes it, for machines (the browser test reads it)."""
        return "null" if self.value is None else repr(self.value)


def _above(value: Any, baseline: Any, *, floor: float | None = None) -> tuple[str, str]:
    if not isinstance(value, (int, float)) or not isinstance(baseline, (int, float)):
        return "not measured", "neutral"
    chance = max(baseline, floor) if floor is not None else baseline
    if value >= chance + CHANCE_MARGIN:
        return "above chance", "good"
    return "at chance", "bad"


def _recall_lift(value: Any, baseline: Any) -> Any:
    if (
        not isinstance(value, (int, float))
        or not isinstance(baseline, (int, float))
        or baseline >= 1
    ):
        return None
    return (value - baseline) / (1 - baseline)


def position_headlines(section: dict[str, Any]) -> list[Headline]:
    """Headline rows of an available ``position_embedding`` section."""
    p = "position_embedding"
    score = section.get("grid_structure_score")
    if not isinstance(score, (int, float)):
        verdict = ("not measured", "neutral")
    elif score >= GRID_SCORE_MAP:
        verdict = ("a map of the grid", "good")
    elif score >= GRID_SCORE_PARTIAL:
        verdict = ("partial grid structure", "neutral")
    else:
        verdict = ("no grid structure", "bad")
    rows = [
        Headline(
            f"{p}.grid_structure_score",
            "Grid structure score (0..1)",
            score,
            "random or shuffled table ~ 0; 2-D sin-cos ~ 1",
            None,
            0.0,
            *verdict,
        ),
        Headline(
            f"{p}.decodability_r2",
            "Decodability of (row, col), cross-validated R²",
            section.get("decodability_r2"),
            f"shuffled positions {fmt(section.get('decodability_r2_shuffled'))}",
            f"{p}.decodability_r2_shuffled",
            section.get("decodability_r2_shuffled"),
            *_above(
                section.get("decodability_r2"), section.get("decodability_r2_shuffled"), floor=0.0
            ),
        ),
    ]
    recall = section.get("neighbour_recall") or {}
    for k in (4, 8):
        value, baseline = recall.get(f"k{k}"), recall.get(f"k{k}_random")
        lift = _recall_lift(value, baseline)
        rows.append(
            Headline(
                f"{p}.neighbour_recall.k{k}",
                f"Neighbour recall@{k}",
                value,
                f"random positions (k{k}_random) {fmt(baseline)}",
                f"{p}.neighbour_recall.k{k}_random",
                baseline,
                *_above(lift, 0.0) if lift is not None else ("not measured", "neutral"),
            )
        )
    spearman = section.get("similarity_distance_spearman")
    spearman_verdict = ("not measured", "neutral")
    if isinstance(spearman, (int, float)):
        spearman_verdict = (
            ("similarity falls with distance", "good")
            if spearman <= -CHANCE_MARGIN
            else ("no fall-off with distance", "bad")
        )
    rows.append(
        Headline(
            f"{p}.similarity_distance_spearman",
            "Similarity vs distance, Spearman (negative = falls with distance)",
            spearman,
            f"chance {fmt(section.get('similarity_distance_spearman_random', 0.0))}",
            f"{p}.similarity_distance_spearman_random",
            section.get("similarity_distance_spearman_random", 0.0),
            *spearman_verdict,
        )
    )
    if "projection_r2" in section:
        rows.append(
            Headline(
                f"{p}.projection_r2",
                "2-D projection fit to the grid, R²",
                section.get("projection_r2"),
                f"shuffled positions {fmt(section.get('projection_r2_shuffled'))}",
                f"{p}.projection_r2_shuffled",
                section.get("projection_r2_shuffled"),
                *_above(section.get("projection_r2"), section.get("projection_r2_shuffled")),
            )
        )
    if "effective_dim" in section:
        rows.append(
            Headline(
                f"{p}.effective_dim",
                "Effective dimensionality",
                section.get("effective_dim"),
                f"Gaussian table {fmt(section.get('effective_dim_random'))}",
                f"{p}.effective_dim_random",
                section.get("effective_dim_random"),
                "lower = variance in fewer directions",
                "neutral",
            )
        )
    return rows


def gradient_headlines(section: dict[str, Any]) -> list[Headline]:
    """Headline rows of an available ``gradients`` section."""
    g = "gradients"
    rows = []
    check = section.get("formula_check") or {}
    tolerance = (check.get("tolerance") or {}).get("min_cosine")
    for side in ("q", "k"):
        passed = check.get("passed")
        rows.append(
            Headline(
                f"{g}.formula_check.min_cosine_{side}",
                f"Formula dL/d{side.upper()} vs autograd, min cosine",
                check.get(f"min_cosine_{side}"),
                f"must be ≥ {fmt(tolerance, 8)}",
                f"{g}.formula_check.tolerance.min_cosine" if tolerance is not None else None,
                tolerance,
                "agrees" if passed else ("disagrees" if passed is False else "not measured"),
                "good" if passed else ("bad" if passed is False else "neutral"),
                digits=8,
            )
        )
    sgd = section.get("sgd_step_check") or {}
    if sgd.get("available", True) and "relative_error" in sgd:
        limit = (sgd.get("tolerance") or {}).get("max_relative_error")
        passed = sgd.get("passed")
        rows.append(
            Headline(
                f"{g}.sgd_step_check.relative_error",
                "One real SGD step on the position embedding: loss change of the first "
                "images vs the first-order prediction -eta·<g_S, g>, relative error",
                sgd.get("relative_error"),
                f"must be ≤ {fmt(limit)}, and every layer's logit changes must follow the "
                "prediction",
                f"{g}.sgd_step_check.tolerance.max_relative_error" if limit is not None else None,
                limit,
                "agrees" if passed else ("disagrees" if passed is False else "not measured"),
                "good" if passed else ("bad" if passed is False else "neutral"),
            )
        )
    verdict = section.get("verdict") or {}
    if "story_holds" in verdict:
        rows.append(
            _three_state(
                f"{g}.verdict.story_holds",
                "Gradient pulls neighbours together, pushes distant patches apart",
                verdict["story_holds"],
                verdict.get("margin_ci95"),
                f"{fmt(verdict.get('layers_holding'))} of {fmt(verdict.get('layers_judged'))} "
                "judged layers hold",
                verdict.get("undecided_reason"),
            )
        )
    if verdict.get("position_embedding_holds", False) is not False or (
        verdict.get("position_embedding_margin_ci95") is not None
    ):
        rows.append(
            _three_state(
                f"{g}.verdict.position_embedding_holds",
                "Gradient pulls neighbouring position embeddings together",
                verdict.get("position_embedding_holds"),
                verdict.get("position_embedding_margin_ci95"),
                "",
                (section.get("position_embedding") or {}).get("undecided_reason"),
            )
        )
    return rows


def qk_headlines(section: dict[str, Any]) -> list[Headline]:
    """Headline rows of an available ``qk_geometry`` section."""
    q = "qk_geometry"
    heads = [h for layer in section.get("layers") or [] for h in layer.get("heads") or []]
    sources = section.get("alignment_source_counts") or {}
    aligned = section.get("aligned_heads")
    return [
        Headline(
            f"{q}.alignment_gap_mean",
            "Q/K cosine, near minus far patches (mean over heads)",
            section.get("alignment_gap_mean"),
            f"shuffled positions {fmt(section.get('alignment_gap_shuffled_mean'))}",
            f"{q}.alignment_gap_shuffled_mean",
            section.get("alignment_gap_shuffled_mean"),
            "positive = queries point like their neighbours' keys",
            "neutral",
        ),
        Headline(
            f"{q}.aligned_heads",
            "Heads whose near-far gap is above the shuffled baseline (95% interval)",
            aligned,
            f"of {len(heads)} heads; {fmt(section.get('undecided_heads'))} undecided",
            None,
            None,
            f"{fmt(sources.get('position'))} from position, {fmt(sources.get('content'))} from content",
            "good" if sources.get("position") else "neutral",
        ),
    ]


def _three_state(
    metric: str,
    label: str,
    holds: bool | None,
    ci: list[float] | None,
    detail: str,
    reason: str | None,
) -> Headline:
    """A verdict row with three states: holds (interval above 0), does not hold (interval
    below 0), undecided (interval across 0, or no interval: neutral, never red)."""
    parts = []
    if ci:
        parts.append(f"95% interval of the margin [{fmt(ci[0])}, {fmt(ci[1])}]")
    if detail:
        parts.append(detail)
    if holds is None and reason:
        parts.append(reason)
    verdict, tone = {
        True: ("holds", "good"),
        False: ("does not hold", "bad"),
        None: ("undecided", "neutral"),
    }[holds]
    return Headline(metric, label, holds, "; ".join(parts), None, None, verdict, tone)


@dataclass(frozen=True)
class Figure:
    name: str
    section: str
    title: str
    caption: str
    src: str  # data: URI


def figures_view(pngs: dict[str, bytes]) -> list[Figure]:
    """The audit's PNG figures in reading order, each embedded as a data: URI."""
    known = [name for name in FIGURES if name in pngs]
    others = sorted(name for name in pngs if name not in FIGURES)
    figures = []
    for name in known + others:
        section, title, caption = FIGURES.get(name, ("other", name.replace("_", " "), ""))
        src = "data:image/png;base64," + base64.b64encode(pngs[name]).decode("ascii")
        figures.append(Figure(name, section, title, caption, src))
    return figures


def policy_view(policy: Any) -> dict[str, Any] | None:
    """The policy result as rows of (rule, value, threshold, verdict), whatever its shape."""
    if not isinstance(policy, dict):
        return None
    rules = policy.get("rules") or []
    rows = []
    for rule in rules if isinstance(rules, list) else []:
        if not isinstance(rule, dict):
            continue
        name = rule.get("rule") or rule.get("path") or rule.get("name") or rule.get("metric") or ""
        if rule.get("op") and rule.get("path") and not rule.get("rule"):
            name = f"{rule['path']} {rule['op']}"
        verdict = rule.get("verdict", rule.get("passed"))
        rows.append(
            {
                "rule": str(name),
                "value": fmt(rule.get("value")),
                "threshold": fmt(rule.get("threshold")),
                "verdict": fmt(verdict),
                "tone": "good"
                if verdict in (True, "pass", "passed")
                else ("bad" if verdict in (False, "fail", "failed") else "neutral"),
                "message": str(rule.get("message") or rule.get("detail") or ""),
            }
        )
    passed = policy.get("passed")
    return {"passed": passed, "shown": fmt(passed), "rules": rows}


def _section_state(report: dict[str, Any], name: str) -> dict[str, Any]:
    section = report.get(name)
    if not isinstance(section, dict):
        return {"present": False, "available": False, "reason": "not requested"}
    available = section.get("available", True) is not False
    return {"present": True, "available": available, "reason": section.get("reason", "")}


def report_view(audit_id: str, report: dict[str, Any], pngs: dict[str, bytes]) -> dict[str, Any]:
    """Everything the report template shows, computed from the report alone."""
    model = report.get("model") or {}
    settings = report.get("settings") or {}
    sections = {
        name: _section_state(report, name)
        for name in ("position_embedding", "heads", "gradients", "qk_geometry")
    }
    qk = report.get("qk_geometry") or {}
    kernel = qk.get("positional_kernel") or {}
    position = report.get("position_embedding") or {}
    heads = report.get("heads") or {}
    gradients = report.get("gradients") or {}
    grid = model.get("grid") or []
    facts = [
        ("Architecture", model.get("arch")),
        ("Patch grid", " x ".join(str(x) for x in grid) if grid else None),
        ("Patch size (px)", model.get("patch_size")),
        ("Input size (px)", " x ".join(str(x) for x in model.get("img_size") or []) or None),
        ("Prefix tokens", model.get("num_prefix_tokens")),
        (
            "Layers x heads",
            f"{model.get('num_layers')} x {model.get('num_heads')}"
            if "num_layers" in model
            else None,
        ),
        ("Embedding dim", model.get("embed_dim")),
        ("Parameters", model.get("num_parameters")),
        ("Format", model.get("format")),
        ("Training step", model.get("training_step")),
        ("Probe set", settings.get("probe_set")),
        ("Images", settings.get("num_images")),
        ("Labels", settings.get("labels_source")),
        ("Seed", settings.get("seed")),
        ("Device", settings.get("device")),
    ]
    counts = heads.get("counts") or {}
    figures = figures_view(pngs)
    groups = []
    for key in ("position_embedding", "heads", "gradients", "qk_geometry", "trajectory", "other"):
        members = [f for f in figures if f.section == key]
        if members:
            groups.append({"key": key, "title": SECTION_TITLES[key], "figures": members})
    timings = report.get("timings") or {}
    return {
        "audit_id": audit_id,
        "title": f"vitaudit report: {model.get('arch', 'unknown model')}",
        "facts": [(label, fmt(value)) for label, value in facts if value is not None],
        "sha256": model.get("checkpoint_sha256") or "",
        "schema_version": report.get("schema_version"),
        "sections": sections,
        "position_headlines": position_headlines(position)
        if sections["position_embedding"]["available"]
        else [],
        "position_kind": position.get("kind"),
        "head_counts": [
            {
                "label": label,
                "count": count,
                "metric": f"heads.counts.{label}",
                "ci95": _interval_text((heads.get("counts_ci95") or {}).get(label)),
            }
            for label, count in counts.items()
        ],
        "head_layers": head_layers_view(heads),
        "head_unstable": sum(
            1
            for layer in heads.get("layers") or []
            for head in layer.get("heads") or []
            if isinstance(head.get("label_stability"), float)
            and head["label_stability"] < UNSTABLE_LABEL_BELOW
        ),
        "head_resamples": (heads.get("bootstrap") or {}).get("resamples"),
        "head_unstable_below": UNSTABLE_LABEL_BELOW,
        "head_total": sum(v for v in counts.values() if isinstance(v, int)),
        "uniform_distance": fmt(heads.get("uniform_mean_distance_patches")),
        "gradient_headlines": gradient_headlines(gradients)
        if sections["gradients"]["available"]
        else [],
        "gradient_summary": (gradients.get("verdict") or {}).get("summary"),
        "qk_headlines": qk_headlines(qk) if sections["qk_geometry"]["available"] else [],
        "kernel_counts": [
            {
                "label": label,
                "count": count,
                "metric": f"qk_geometry.positional_kernel.counts.{label}",
            }
            for label, count in (kernel.get("counts") or {}).items()
        ],
        "kernel_reason": kernel.get("reason"),
        "policy": policy_view(report.get("policy")),
        "groups": groups,
        "notes": [str(n) for n in report.get("notes") or []],
        "timings": [(k, fmt(v)) for k, v in timings.items()],
        "versions": [(k, fmt(v)) for k, v in (report.get("versions") or {}).items()],
        "json_url": f"/v1/audits/{audit_id}/report",
        "artifacts_url": f"/v1/audits/{audit_id}/artifacts",
    }


# A head label that holds in fewer bootstrap resamples than this is counted as unstable
# (the same cut as the hatching of the head label map).
UNSTABLE_LABEL_BELOW = 0.8


def _interval_text(bounds: Any) -> str:
    """``[lo, hi]`` as 'lo–hi', '' when the report has no interval."""
    if not isinstance(bounds, list) or len(bounds) != 2 or None in bounds:
        return ""
    return f"{fmt(bounds[0])}–{fmt(bounds[1])}"


def head_layers_view(heads: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per layer of the heads section: mean distance with its 95 % interval, the
    label stability of the layer's label counts, and the labels with their counts."""
    rows = []
    for layer in heads.get("layers") or []:
        labels: dict[str, int] = {}
        for head in layer.get("heads") or []:
            labels[head.get("label")] = labels.get(head.get("label"), 0) + 1
        index = layer.get("layer")
        rows.append(
            {
                "layer": index,
                "distance": fmt(layer.get("mean_distance_patches")),
                "ci95": _interval_text(layer.get("mean_distance_patches_ci95")),
                "stability": fmt(layer.get("label_stability"), 2),
                "stability_metric": f"heads.layers.{index}.label_stability",
                "labels": ", ".join(f"{name} x{n}" for name, n in labels.items()),
            }
        )
    return rows


def render_report_page(audit_id: str, report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """The self-contained HTML report of one audit."""
    return TEMPLATES.get_template("report.html").render(**report_view(audit_id, report, pngs))


def render_index_page(audits: list[dict[str, Any]], tenant: str, *, signed_in: bool = False) -> str:
    """The landing page: recent audits with status and links, and the submit form; a sign-out
    button when the browser is signed in with an API key."""
    return TEMPLATES.get_template("index.html").render(
        audits=audits, tenant=tenant, fmt=fmt, signed_in=signed_in
    )


def render_login_page(next_path: str, error: str | None) -> str:
    """The sign-in form; ``next_path`` is where the browser goes once signed in."""
    return TEMPLATES.get_template("login.html").render(
        next=next_path, error=error, session_hours=SESSION_TTL_S // 3600
    )


def safe_next(target: str | None) -> str:
    """Where to send the browser after sign-in: a path on this service ("/..."), never
    another site ("//host", "https://...", a backslash or a control character that browsers
    drop or turn into "/"); anything else is "/"."""
    plain = target is not None and target.isprintable() and not any(c.isspace() for c in target)
    if plain and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _to_login(request: Request[Any, Any, Any]) -> Redirect:
    return Redirect(f"/login?next={quote(request.url.path)}", status_code=303)


# Pages need no other origin: the report page has no script at all; the landing page runs
# its own inline script and talks to this origin only.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
INDEX_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'"
)
LOGIN_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'self'"


@dataclass
class LoginForm:
    key: str
    next: str = "/"


def _html(body: str, csp: str) -> Response[str]:
    return Response(
        body,
        media_type=MediaType.HTML,
        headers={
            "content-security-policy": csp,
            "x-content-type-options": "nosniff",
            # Not "no-referrer": under it a browser sends "Origin: null" with the pages' own
            # form posts (sign-in, sign-out), which the origin check must refuse. Other sites
            # still get no referrer.
            "referrer-policy": "same-origin",
        },
    )


class PageController(Controller):
    """HTML for people; the JSON API stays the contract (pages are left out of the schema)."""

    include_in_schema = False

    @get("/", summary="Landing page: recent audits and a form to submit one")
    async def index(
        self,
        request: Request[Any, Any, State],
        settings: NamedDependency[Settings],
        page_tenant: NamedDependency[str | None],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> Response[str]:
        if page_tenant is None:
            return _to_login(request)
        audits = [
            {
                "id": state.id,
                "arch": state.arch,
                "status": state.status,
                "progress": state.progress,
                "stage": state.stage,
                "created_at": state.created_at,
                "error": state.error.detail if state.error else None,
                "report_url": f"/v1/audits/{state.id}/report.html",
                "status_url": f"/v1/audits/{state.id}",
            }
            for state in recent_states(page_tenant, store, queue, RECENT_AUDITS)
        ]
        # Signed in by the cookie (a header key or local mode has nothing to sign out of).
        signed_in = not settings.local_mode and not sends_header_key(request)
        return _html(render_index_page(audits, page_tenant, signed_in=signed_in), INDEX_CSP)

    @get(
        "/v1/audits/{audit_id:str}/report.html",
        summary="The report as one self-contained HTML page",
    )
    async def report_page(
        self,
        audit_id: FromPath[str],
        request: Request[Any, Any, State],
        page_tenant: NamedDependency[str | None],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> Response[str]:
        if page_tenant is None:
            return _to_login(request)
        report = finished_report(audit_id, owned_record(audit_id, page_tenant, store), store, queue)
        pngs = {}
        for name in store.list_artifacts(audit_id):
            data = store.read_bytes(audit_id, name) if name.endswith(".png") else None
            if data is not None:
                pngs[name[: -len(".png")]] = data
        return _html(render_report_page(audit_id, report, pngs), REPORT_CSP)

    @get("/login", summary="Sign-in form: an API key for this browser")
    async def login_page(
        self, settings: NamedDependency[Settings], next: FromQuery[str] = "/"
    ) -> Response[str]:
        if settings.local_mode:  # nothing to sign in to
            return Redirect(safe_next(next), status_code=303)
        return _html(render_login_page(safe_next(next), None), LOGIN_CSP)

    @post("/login", summary="Sign in: open a session for this browser", status_code=303)
    async def login(
        self,
        request: Request[Any, Any, State],
        settings: NamedDependency[Settings],
        queue: NamedDependency[AuditQueue],
        data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[str]:
        target = safe_next(data.next)
        key = data.key.strip()
        if settings.local_mode:
            return Redirect(target, status_code=303)
        check_same_origin(request, settings)  # no sign-in forged by another site
        if tenant_for_key(key, settings) is None:
            page = _html(render_login_page(target, "That API key is not valid."), LOGIN_CSP)
            page.status_code = 401
            return page
        session = Cookie(
            key=session_cookie_name(request, settings),
            value=open_session(queue.redis, hash_key(key)),
            path="/",
            max_age=SESSION_TTL_S,
            httponly=True,
            samesite="strict",
            secure=is_https(request, settings),
        )
        return Redirect(target, status_code=303, cookies=[session])

    @post("/logout", summary="Sign out: end the session and forget its cookie", status_code=303)
    async def logout(
        self,
        request: Request[Any, Any, State],
        settings: NamedDependency[Settings],
        queue: NamedDependency[AuditQueue],
    ) -> Response[str]:
        check_same_origin(request, settings)
        https = is_https(request, settings)
        token = request.cookies.get(session_cookie_name(request, settings))
        if token:
            revoke_session(queue.redis, token)  # a copy of the cookie stops working too
        gone = [
            Cookie(
                key=name,
                value="",
                path="/",
                max_age=0,
                httponly=True,
                samesite="strict",
                secure=https,
            )
            for name in ((SESSION_COOKIE, SECURE_SESSION_COOKIE) if https else (SESSION_COOKIE,))
        ]
        return Redirect("/login", status_code=303, cookies=gone)
