"""The report contract, described once: typed models of ``report.json`` from which the
worker's output is validated, the OpenAPI response of ``GET /v1/audits/{id}/report`` and the
JSON Schema served at ``GET /v1/schema/report`` (and shipped as
``service/schemas/report.schema.json``) are all generated.

Plain msgspec, no torch: the API imports it too. A section is one model whose analysis
fields are optional: a section that did not run is ``{"available": false, "reason": ...}``
(plus ``error``, the exception class, when it failed). Fields not described here are
allowed (a report may carry more), but every field described keeps its type and meaning.

``SCHEMA_VERSION`` follows semver: adding a field is a minor bump; removing a field or
changing its type or meaning is a major bump. ``tests/test_report_schema.py`` fails when the
generated schema differs from the shipped one, and says which bump the change needs.
"""

from typing import Annotated, Any

import msgspec

SCHEMA_VERSION = "2.1.0"


def _d(kind: Any, description: str) -> Any:
    """``kind`` with a description in the schema."""
    return Annotated[kind, msgspec.Meta(description=description)]


Number = float | None  # NaN and infinities are written as null
Interval = _d(list[Number] | None, "95% bootstrap interval [lo, hi] over probe images")


class Section(msgspec.Struct, kw_only=True):
    available: _d(bool, "false when the section did not apply or failed; then `reason` says why")
    reason: _d(str | None, "why the section is unavailable") = None
    error: _d(str | None, "the exception class, when the section failed") = None


class ReportModel(msgspec.Struct, kw_only=True):
    arch: _d(str | None, "timm architecture the checkpoint was built as") = None
    format: _d(str, "checkpoint format: torch, onnx or transformers") = "torch"
    grid: _d(list[int], "patch grid [rows, cols] the model sees")
    patch_size: _d(int, "patch side in pixels")
    img_size: _d(list[int] | None, "input size [H, W] in pixels") = None
    num_prefix_tokens: _d(int, "class, distillation and register tokens before the patches")
    num_layers: _d(int, "transformer blocks")
    num_heads: _d(int, "attention heads per block")
    embed_dim: _d(int | None, "token width") = None
    num_classes: _d(int | None, "outputs of the head (0 for a backbone)") = None
    checkpoint_sha256: _d(str, "sha256 of the checkpoint file as uploaded")
    in_chans: _d(int | None, "input channels (1: grayscale probes)") = None
    block_type: _d(str | None, "timm block class (Block, ParallelScalingBlock, ...)") = None
    model_type: _d(str | None, "transformers config model_type (format transformers)") = None
    training_step: _d(int | None, "the checkpoint's step (trajectory audits)") = None


class ReportSettings(msgspec.Struct, kw_only=True):
    probe_set: _d(str, "images audited: uploaded, natural-v1 or texture-v1")
    num_images: _d(int, "images the audit used")
    batch_size: _d(int, "images per batch")
    seed: _d(int, "seed of every random choice (same inputs + seed = same numbers)")
    labels_source: _d(str | None, "given (uploaded labels) or model_predictions") = None
    analyses: _d(list[str] | None, "sections requested") = None
    device: _d(str | None, "cpu or cuda") = None
    normalization: _d(
        dict[str, Any] | None, "{mean, std, source}: how the probe images were normalised"
    ) = None
    precision: _d(str | None, "fp32 (TF32 matmuls on CUDA) or bf16 (autocast forward)") = None
    batch_size_used: _d(
        int | None, "images per batch that ran (below batch_size after out-of-memory retries)"
    ) = None


class NeighbourRecall(msgspec.Struct, kw_only=True):
    k4: _d(Number, "share of each patch's 4 most similar embeddings that are grid neighbours")
    k8: _d(Number, "the same at k=8")
    k4_random: _d(Number, "expected k4 for a table without grid structure (chance)")
    k8_random: _d(Number, "expected k8 for a table without grid structure (chance)")


class PositionEmbedding(Section, kw_only=True):
    kind: _d(str | None, "learned_absolute, fixed_sincos, fixed_absolute, none, rotary, ...") = None
    kind_detail: _d(str | None, "how the table was found and what it is") = None
    grid: _d(list[int] | None, "the audit's patch grid [rows, cols]") = None
    table_grid: _d(list[int] | None, "the grid the stored table covers (analysed as stored)") = None
    resampled: _d(bool | None, "true when the model's table was resampled from the stored one") = (
        None
    )
    grid_structure_score: _d(
        Number,
        "0..1; about 0 for random or shuffled tables, 1 for a 2-D sin-cos table: how much the "
        "table is a map of the patch grid (decodability and neighbour-recall lift)",
    ) = None
    decodability_r2: _d(
        Number, "<= 1; cross-validated ridge R^2 of (row, col) from the embedding"
    ) = None
    decodability_r2_shuffled: _d(Number, "the same R^2 with positions shuffled (chance)") = None
    decodability_r2_blocked: _d(
        Number,
        "<= 1; the same R^2 with spatially blocked folds (whole bands of rows, then of columns, "
        "held out): global linear layout; about 0 or below for a table that is only locally "
        "smooth",
    ) = None
    decodability_folds: _d(dict[str, Any] | None, "the cross-validation schemes, named") = None
    resample_method: _d(
        str | None, "how the model's table was made from the stored one (when resampled)"
    ) = None
    similarity_distance_spearman: _d(
        Number, "-1..1; rank correlation of cosine similarity with grid distance (negative: a map)"
    ) = None
    similarity_distance_spearman_random: _d(Number, "the same for permuted tables") = None
    similarity_distance_spearman_random_std: _d(Number, "its spread over the permutations") = None
    neighbour_recall: NeighbourRecall | None = None
    row_col_anisotropy: _d(Number, "-1..1; row vs column similarity decay") = None
    effective_dim: _d(Number, ">= 1; participation ratio of the table's PCA spectrum") = None


class HeadStats(msgspec.Struct, kw_only=True):
    head: _d(int, "head index in its layer")
    label: _d(
        str,
        "local, horizontal, vertical, global, texture, content, sink, prefix or mixed (first "
        "matching rule of heads.label_rules)",
    )
    mean_distance_px: _d(Number, ">= 0; attention-weighted query-key distance in pixels") = None
    mean_distance_patches: _d(Number, ">= 0; the same in patches") = None
    mean_distance_patches_ci95: Interval = None
    label_stability: _d(
        Number, "0..1; share of bootstrap resamples of the images that give the same label"
    ) = None
    support_share: _d(Number, "0..1; exp(entropy) / N: share of patches effectively attended") = (
        None
    )
    sink_mass: _d(Number, "0..1; key-profile mass on the top 2% of keys (sink when >= 0.5)") = None
    texture_lift_flat: _d(
        Number, "texture_lift with every patch flattened to its mean colour (the control)"
    ) = None
    key_content_dependence: _d(
        Number, "0..1; share of the key profile's energy that varies across images"
    ) = None
    entropy: _d(Number, "0..1; attention entropy over the keys / its maximum") = None
    local_mass: _d(Number, "0..1; attention on the query's own and neighbouring patches") = None
    horizontal: _d(Number, "-1..1; preference for keys on the query's row") = None
    vertical: _d(Number, "-1..1; preference for keys on the query's column") = None
    prefix_mass: _d(Number, "0..1; attention on the prefix tokens") = None
    content_dependence: _d(Number, ">= 0; how much the maps change with the image") = None
    texture_lift: _d(Number, ">= 0; attention on textured patches / their share (1: none)") = None


class HeadLayer(msgspec.Struct, kw_only=True):
    layer: _d(int, "block index")
    heads: list[HeadStats]
    mean_distance_patches: _d(Number, "mean of the layer's heads") = None
    mean_distance_patches_ci95: Interval = None
    label_stability: _d(Number, "0..1; share of resamples giving the layer the same counts") = None


class Heads(Section, kw_only=True):
    uniform_mean_distance_patches: _d(
        Number, "mean distance of uniform attention on this grid (the baseline)"
    ) = None
    layers: list[HeadLayer] | None = None
    counts: _d(dict[str, int] | None, "heads per label") = None
    counts_ci95: _d(dict[str, list[Number]] | None, "95% bootstrap interval of each count") = None
    mean_map_queries: _d(
        int | None,
        "query patches whose mean maps are kept (content_dependence, head_diversity, the "
        "attention_mean_maps artifact): every patch, or a regular sub-grid on large grids",
    ) = None


class FormulaCheck(msgspec.Struct, kw_only=True):
    min_cosine_q: _d(Number, "-1..1; (1/sqrt d) sum_j dL/ds_ij K_j vs autograd's dL/dQ; ~1")
    min_cosine_k: _d(Number, "-1..1; the same for dL/dK; ~1")
    passed: bool
    num_images: _d(int | None, "the first images the check summed (whole batches, >= 16)") = None


class GradientVerdict(msgspec.Struct, kw_only=True):
    story_holds: _d(
        bool | None,
        "true: logit pressure positive near and negative far in a majority of layers (margin "
        "interval above 0); false: interval below 0; null: undecided (see undecided_reason)",
    ) = None
    undecided_reason: _d(str | None, "why the verdict is null") = None
    margin: _d(Number, "the deciding layer's min(near, -far) logit pressure, mean over images") = (
        None
    )
    margin_ci95: Interval = None
    position_embedding_holds: _d(
        bool | None, "neighbouring position embeddings pulled together (interval above 0)"
    ) = None
    position_embedding_margin_ci95: Interval = None
    layer_margins_ci95: _d(list[list[Number] | None] | None, "each layer's margin interval") = None


class SgdStepCheck(msgspec.Struct, kw_only=True):
    available: bool
    reason: str | None = None
    eta: _d(Number, "the step size along -g") = None
    num_images: _d(
        int | None, "the first images run again (>= 16 whole batches, or all of them)"
    ) = None
    subset_gradient_cosine: _d(
        Number, "-1..1; cosine of those images' own gradient g_S with g (all when < 0.1)"
    ) = None
    loss_before: _d(Number, "mean loss of those images before the step") = None
    loss_after: _d(Number, "their mean loss after stepping the model's own position table") = None
    loss_change_real: _d(Number, "loss_after - loss_before") = None
    loss_change_predicted: _d(Number, "-eta * <g_S, g>, the first-order prediction") = None
    relative_error: _d(Number, ">= 0; |real - predicted| / |predicted|; passes at <= 0.2") = None
    logit_change_correlation: _d(
        list[Number] | None,
        "-1..1 per layer: real vs predicted change of the patch-to-patch logits; passes at >= 0.9",
    ) = None
    passed: bool | None = None


class Gradients(Section, kw_only=True):
    objective: _d(
        dict[str, Any] | None,
        "{name, description}: labels, predictions, or instance_discrimination for embedding models",
    ) = None
    loss: _d(Number, "mean loss over the audited images") = None
    formula_check: FormulaCheck | None = None
    sgd_step_check: _d(
        SgdStepCheck | None,
        "one real SGD step on the model's position table, the same images again",
    ) = None
    verdict: GradientVerdict | None = None


class QKHead(msgspec.Struct, kw_only=True):
    head: int
    alignment_gap: _d(
        Number, "-2..2; mean cos(Q_i, K_j) of neighbouring patches minus that of distant ones"
    ) = None
    alignment_gap_ci95: Interval = None
    alignment_gap_shuffled: _d(Number, "the same with patch positions shuffled (~0)") = None
    alignment_gap_shuffled_ci95: Interval = None
    alignment_spearman: _d(Number, "-1..1; rank correlation of cos(Q_i, K_j) with distance") = None
    alignment_above_shuffled: _d(
        bool | None, "true/false from the intervals; null when they overlap (undecided_reason)"
    ) = None
    alignment_source: _d(str | None, "position, content or none: what produces the gap") = None
    positional_kernel_label: _d(
        str | None, "local, horizontal, vertical, global or mixed: the position-only kernel"
    ) = None


class QKLayer(msgspec.Struct, kw_only=True):
    layer: int
    heads: list[QKHead]


class QKGeometry(Section, kw_only=True):
    alignment_gap_mean: _d(Number, "mean alignment gap over heads") = None
    aligned_heads: _d(int | None, "heads whose gap is above the shuffled interval") = None
    layers: list[QKLayer] | None = None


class ReportVersions(msgspec.Struct, kw_only=True):
    vitaudit: str | None = None
    torch: str | None = None
    timm: str | None = None
    onnxruntime: str | None = None


class Report(msgspec.Struct, kw_only=True):
    """One audit's report.json."""

    schema_version: _d(str, "semver of this contract (major: incompatible change)")
    model: ReportModel
    settings: ReportSettings
    position_embedding: PositionEmbedding
    heads: Heads
    gradients: Gradients
    qk_geometry: QKGeometry
    notes: _d(list[str], "what the reader must know about how the numbers were made")
    timings: _d(dict[str, float], "seconds per stage")
    versions: ReportVersions
    policy: _d(dict[str, Any] | None, "the policy's rules and verdicts, when one was sent") = None
    trajectory: _d(
        dict[str, Any] | None,
        "for a training run: headline numbers per checkpoint step (each step's own report is "
        "the artifact step-<step>.json)",
    ) = None


def report_json_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), with ``$defs`` for every model."""
    schema = msgspec.json.schema(Report)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vitaudit report",
        "version": SCHEMA_VERSION,
        **schema,
    }


class ReportInvalid(ValueError):
    """A report does not keep the contract; the message names the field."""


def validate_report(report: dict[str, Any]) -> None:
    """Raise ReportInvalid when ``report`` does not keep the contract (types of every
    described field; extra fields are allowed)."""
    try:
        msgspec.convert(report, Report)
    except msgspec.ValidationError as exc:
        raise ReportInvalid(f"the report does not keep schema {SCHEMA_VERSION}: {exc}") from None


def major(version: str) -> int:
    """The major part of a schema version ("2.1.0" -> 2; "1.0" -> 1)."""
    head = str(version).split(".")[0]
    if not head.isdigit():
        raise ValueError(f"schema_version {version!r} is not a version number")
    return int(head)


def _fields(schema: dict[str, Any]) -> dict[str, str]:
    """Every described field as ``Model.field`` -> its type (descriptions left out)."""

    def bare(node: Any) -> Any:
        if isinstance(node, dict):
            # sorted: the shipped file is written with sort_keys, a fresh schema is not
            return {k: bare(node[k]) for k in sorted(node) if k not in ("description", "title")}
        if isinstance(node, list):
            return [bare(v) for v in node]
        return node

    found = {}
    for model, spec in schema.get("$defs", {}).items():
        required = set(spec.get("required", []))
        for name, prop in spec.get("properties", {}).items():
            found[f"{model}.{name}"] = repr((bare(prop), name in required))
    return found


def required_bump(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The semver part a schema change needs: "major" (a field removed, or its type or
    requiredness changed), "minor" (fields added), "patch" (descriptions only), None (same)."""
    before, after = _fields(old), _fields(new)
    if any(name not in after or after[name] != kind for name, kind in before.items()):
        return "major"
    if after.keys() - before.keys():
        return "minor"
    return "patch" if old != new else None


def bump_is_enough(old_version: str, new_version: str, needed: str | None) -> bool:
    """Whether ``new_version`` moved past ``old_version`` by at least the ``needed`` part."""
    old = [int(x) for x in (str(old_version).split(".") + ["0", "0"])[:3]]
    new = [int(x) for x in (str(new_version).split(".") + ["0", "0"])[:3]]
    if needed is None:
        return new == old
    if needed == "major":
        return new[0] > old[0]
    if needed == "minor":
        return new[0] > old[0] or (new[0] == old[0] and new[1] > old[1])
    return new > old


SHIPPED_SCHEMA = "service/schemas/report.schema.json"


def main(argv: list[str] | None = None) -> int:
    """Write the report's JSON Schema to the shipped file (`make openapi` runs this), refusing
    when SCHEMA_VERSION was not bumped as far as the change needs."""
    import json
    import sys
    from pathlib import Path

    target = Path((argv or sys.argv[1:] or [SHIPPED_SCHEMA])[0])
    new = report_json_schema()
    if target.exists():
        old = json.loads(target.read_text())
        needed = required_bump(old, new)
        if not bump_is_enough(old.get("version", "0"), SCHEMA_VERSION, needed):
            print(
                f"the report schema changed ({needed} change) but SCHEMA_VERSION "
                f"{SCHEMA_VERSION} is not a {needed} bump from {old.get('version')}: raise it in "
                "workers/report_schema.py first",
                file=sys.stderr,
            )
            return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    print(f"wrote {target} (schema {SCHEMA_VERSION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
