"""AuditController: submit, list, status, report, artifacts, delete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.openapi.spec.operation import Operation
from litestar.params import FromPath, FromQuery
from litestar.response import File, Response, Stream
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from service.architectures import check_architecture
from service.checkpoints import (
    attach_known_checkpoint,
    cached_audit,
    remember_checkpoints,
    remember_request,
    request_key,
)
from service.code_version import analysis_code_version, report_is_reusable
from service.errors import (
    CheckpointError,
    InvalidRequest,
    NotFound,
    NotReady,
    problem_responses,
    redact,
)
from service.logs import bind_audit_id
from service.models import (
    ArtifactList,
    AuditCreated,
    AuditLinks,
    AuditOptions,
    AuditState,
    JobError,
    options_description,
)
from service.policy import PolicyError, parse_policy
from service.queue import TENANT_INDEX, AuditQueue
from service.quotas import TenantQuota, submitted_bytes
from service.retention import reclaim_orphan
from service.settings import Settings
from service.store import ArtifactStore, LocalStore, new_audit_id
from service.transformers_upload import is_transformers, mark_transformers, transformers_model
from service.upload_lease import upload_lease
from service.uploads import ReceivedForm, StoredFile, receive_form
from workers.report_schema import Report

ARTIFACT_CHUNK_BYTES = 256 * 1024  # what one streamed artifact holds in memory at a time
# Labels and steps are stored and handed to torch as 64-bit integers; a larger one is refused
# here rather than failing later as an overflow.
MAX_JSON_INT = 2**63 - 1


def _json_list_of_ints(raw: str, field: str, meaning: str) -> list[int]:
    """``raw`` as a JSON list of integers in 0..MAX_JSON_INT, or 400 saying what is wrong
    (also for JSON nested too deep to parse, or with a number too long to convert)."""
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{field} must be a JSON list of {meaning}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        reason = (
            "it is nested too deeply" if isinstance(exc, RecursionError) else "a number is too long"
        )
        raise InvalidRequest(f"{field} must be a JSON list of {meaning}: {reason}") from None
    if not isinstance(values, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in values
    ):
        raise InvalidRequest(f"{field} must be a JSON list of non-negative integers ({meaning})")
    if any(x > MAX_JSON_INT for x in values):
        raise InvalidRequest(f"{field} holds an integer over {MAX_JSON_INT} (2**63 - 1)")
    return values


def _chunks(body: IO[bytes]) -> Iterator[bytes]:
    """An object-store body in chunks, closed at the end (or when the client goes away)."""
    try:
        while chunk := body.read(ARTIFACT_CHUNK_BYTES):
            yield chunk
    finally:
        body.close()


@dataclass
class ArtifactOperation(Operation):
    """The artifact download, with the content types it is served with (Litestar's File
    response would declare none)."""

    def __post_init__(self) -> None:
        binary = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format="binary"))
        ok = self.responses["200"]  # type: ignore[index]
        ok.description = "The file, with the content type of its kind"
        # JSON documents are served as application/json too, but declaring that type makes
        # openapi-python-client parse every artifact as JSON (a PNG then fails): as binary
        # downloads, a generated client returns the bytes of every kind.
        ok.content = {
            "image/png": binary,
            "application/octet-stream": binary,
            "text/html": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
        }


@dataclass
class SubmitAuditOperation(Operation):
    """The multipart body of POST /v1/audits, declared by hand: the route reads the raw stream."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format="binary")
        self.request_body = RequestBody(
            required=True,
            description="The checkpoint, its timm architecture and optional images, labels and options.",
            content={
                "multipart/form-data": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        properties={
                            "checkpoint": Schema(
                                type=OpenAPIType.ARRAY,
                                items=binary,
                                description=".safetensors, .pth/.pt/.bin state dict, .onnx, or a "
                                "transformers save_pretrained folder as one .zip/.tar; several "
                                "(in training order) for a trajectory audit",
                            ),
                            "arch": Schema(
                                type=OpenAPIType.STRING,
                                description="timm model name, e.g. vit_small_patch16_224; not needed "
                                "for a transformers checkpoint, whose config names the model",
                            ),
                            "config": Schema(
                                type=OpenAPIType.STRING,
                                format="binary",
                                description="config.json of a transformers model whose weights are the "
                                ".safetensors checkpoint (a .zip/.tar folder holds its own)",
                            ),
                            "images": Schema(
                                type=OpenAPIType.ARRAY,
                                items=binary,
                                description="image files, or one .zip/.tar archive of images",
                            ),
                            "labels": Schema(
                                type=OpenAPIType.STRING,
                                description="JSON list of class indices, one per image",
                            ),
                            "steps": Schema(
                                type=OpenAPIType.STRING,
                                description="with several checkpoints (a training run, in order): JSON list of their training steps",
                            ),
                            "options": Schema(
                                type=OpenAPIType.STRING, description=options_description()
                            ),
                            "policy": Schema(
                                type=OpenAPIType.STRING,
                                description="policy TOML ([[rule]] tables with path and min/max); "
                                "the worker stores the verdicts in report.policy",
                            ),
                            "checkpoint_sha256": Schema(
                                type=OpenAPIType.STRING,
                                description="instead of the checkpoint file: the sha256 of one the service "
                                "already holds (see GET /v1/checkpoints/{sha256})",
                            ),
                            "cache": Schema(
                                type=OpenAPIType.STRING,
                                description="'false': run a new audit even when an identical request was answered",
                            ),
                        },
                    ),
                    encoding={},
                )
            },
        )


def _links(audit_id: str) -> AuditLinks:
    base = f"/v1/audits/{audit_id}"
    return AuditLinks(self=base, report=f"{base}/report", artifacts=f"{base}/artifacts")


def _parse_options(raw: str | None) -> AuditOptions:
    if raw is None or not raw.strip():
        return AuditOptions()
    try:
        return msgspec.json.decode(raw.encode(), type=AuditOptions)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"options: {exc}") from None


def _parse_labels(raw: str | None) -> list[int] | None:
    if raw is None or not raw.strip():
        return None
    labels = _json_list_of_ints(raw, "labels", "class indices")
    if not labels:
        raise InvalidRequest(
            "labels is an empty list; leave it out to use the model's own predictions"
        )
    return labels


def _parse_steps(raw: str | None, count: int) -> list[int]:
    if raw is None or not raw.strip():
        return list(range(count))
    steps = _json_list_of_ints(raw, "steps", "training steps")
    if len(steps) != count:
        raise InvalidRequest(
            f"{len(steps)} steps were given for {count} checkpoints; give one step per checkpoint"
        )
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise InvalidRequest("steps must increase: send the checkpoints of a run in training order")
    return steps


def _parse_policy(raw: str | None) -> str | None:
    """The policy TOML text, checked now so a bad policy is a 400 and not a failed job."""
    if raw is None or not raw.strip():
        return None
    try:
        rules = parse_policy(raw)
    except PolicyError as exc:
        raise InvalidRequest(f"policy: {exc}") from None
    relative = [r for r in rules if r.needs_baseline]
    if relative:
        raise InvalidRequest(
            f"policy: rule {relative[0].index} ({relative[0].path}) compares with a baseline (max_drop/max_rise), "
            "which the service does not take; gate baselines with `vitaudit audit --baseline REPORT`"
        )
    return raw


def _checkpoint_record(file: StoredFile, root: Path) -> dict[str, Any]:
    if file.size == 0:
        raise CheckpointError(f"checkpoint '{file.filename}' is empty")
    return {
        "filename": file.filename,
        "path": str(file.path.relative_to(root)),
        "bytes": file.size,
        "sha256": file.sha256,
        "format": "onnx" if file.path.suffix == ".onnx" else "torch",
    }


def _request_record(audit_id: str, tenant: str, form: ReceivedForm) -> dict[str, Any]:
    checkpoints = form.files_of("checkpoint")
    if not checkpoints:
        raise InvalidRequest("the 'checkpoint' file is missing")
    if len({f.path.suffix for f in checkpoints}) > 1:
        raise InvalidRequest("the checkpoints of one trajectory must all have the same file type")
    configs = form.files_of("config")
    config = configs[0] if configs else None
    model_type = None
    if is_transformers(checkpoints, config):  # the config names the model; arch may be left out
        given = form.fields.get("arch", "").strip() or None
        form.fields["arch"], model_type = transformers_model(checkpoints, config, given)
    if "arch" not in form.fields:
        raise InvalidRequest(
            "the 'arch' field is missing; name a timm ViT, e.g. 'vit_small_patch16_224'"
        )
    arch = check_architecture(form.fields["arch"])
    options = _parse_options(form.fields.get("options"))
    labels = _parse_labels(form.fields.get("labels"))
    policy = _parse_policy(form.fields.get("policy"))
    inputs = checkpoints[0].path.parent
    records = [_checkpoint_record(f, inputs.parent) for f in checkpoints]
    steps = _parse_steps(form.fields.get("steps"), len(checkpoints))
    images = form.files_of("images")
    images_digest = (
        hashlib.sha256("".join(f.sha256 for f in images).encode()).hexdigest() if images else None
    )
    record = {
        "id": audit_id,
        "tenant": tenant,
        "created_at": datetime.now(UTC).isoformat(),
        # The analysis code this API runs: part of the cache key, and what the worker
        # compares its own with (see service.code_version).
        "analysis_code": analysis_code_version(),
        "arch": arch,
        "options": msgspec.to_builtins(options),
        "labels": labels,
        # The audited checkpoint; for a trajectory, the last one (the end of the run).
        "checkpoint": records[-1],
        "trajectory": [{**r, "step": s} for r, s in zip(records, steps, strict=True)]
        if len(records) > 1
        else None,
        "images": [
            {
                "filename": f.filename,
                "path": str(f.path.relative_to(inputs.parent)),
                "bytes": f.size,
                "sha256": f.sha256,
            }
            for f in images
        ],
        "images_sha256": images_digest,
        "policy": policy,
    }
    if model_type is not None:
        mark_transformers(record, model_type, config, inputs.parent)
    return record


def audit_state(
    audit_id: str, record: dict[str, Any], store: ArtifactStore, queue: AuditQueue
) -> AuditState:
    # Touch the store only when the answer depends on it: this runs on every status poll.
    job = queue.state(audit_id)
    report_ready = job is None or job.status == "finished"
    if report_ready:
        report_ready = store.has_artifact(audit_id, "report.json")
    failure = store.read_json(audit_id, "error.json") if job is None else None
    lost = (
        job is not None
        and job.status == "failed"
        and (job.error or {}).get("code") == "worker_lost"
    )
    if lost and store.read_json(audit_id, "error.json") is None:
        # Only the API learns that a worker was lost; keep the reason in the store too, so the
        # audit still reads as failed (and is not queued again) after RQ expires the job.
        with contextlib.suppress(OSError):
            store.write_json(audit_id, "error.json", job.error)
    if job is None and not report_ready and failure is None:
        # RQ lost the job (Redis restarted without persistence, or the job expired before
        # it ran): the request is still in the store, so queue it again rather than lose it.
        queue.enqueue(audit_id)
        job = queue.state(audit_id)
    status = job.status if job else ("finished" if report_ready else "failed")
    if status == "finished" and not report_ready:
        status = "failed"
        failure = failure or {
            "code": "no_report",
            "detail": "the job ended without writing a report",
        }
    error = None
    if status == "failed":
        err = (
            (job.error if job else None)
            or failure
            or {"code": "unknown", "detail": "the job failed"}
        )
        error = JobError(
            code=str(err.get("code", "unknown")), detail=redact(str(err.get("detail", "")))
        )
    report = store.read_json(audit_id, "report.json") if report_ready and not job else None
    timings = job.timings if job else (report or {}).get("timings", {})
    return AuditState(
        id=audit_id,
        status=status,  # type: ignore[arg-type]
        progress=1.0 if status == "finished" else (job.progress if job else 0.0),
        stage=job.stage if job else None,
        arch=record["arch"],
        checkpoint_sha256=record["checkpoint"]["sha256"],
        created_at=record["created_at"],
        started_at=job.started_at if job else None,
        ended_at=job.ended_at if job else None,
        timings=timings,
        error=error,
        links=_links(audit_id),
    )


def owned_record(audit_id: str, tenant: str, store: ArtifactStore) -> dict[str, Any]:
    """The audit's request record, or 404 (also for another tenant's audit)."""
    record = store.read_json(audit_id, "request.json")
    if record is None or record.get("tenant") != tenant:
        raise NotFound(f"no audit '{audit_id}'")
    return record


def recent_states(
    tenant: str, store: ArtifactStore, queue: AuditQueue, limit: int
) -> list[AuditState]:
    """The tenant's ``limit`` most recent audits, newest first (deleted ones skipped)."""
    states = []
    for raw in queue.redis.zrevrange(TENANT_INDEX.format(tenant=tenant), 0, limit - 1):
        audit_id = raw.decode()
        record = store.read_json(audit_id, "request.json")
        if record is not None:
            states.append(audit_state(audit_id, record, store, queue))
    return states


def finished_report(
    audit_id: str, record: dict[str, Any], store: ArtifactStore, queue: AuditQueue
) -> dict[str, Any]:
    """The audit's report, or 409 saying why there is none yet (still running, or failed)."""
    report = store.read_json(audit_id, "report.json")
    if report is None:
        state = audit_state(audit_id, record, store, queue)
        if state.status == "failed" and state.error:
            raise NotReady(f"audit '{audit_id}' failed: {state.error.detail}")
        raise NotReady(
            f"audit '{audit_id}' is {state.status}; poll /v1/audits/{audit_id} until it is finished"
        )
    return report


class AuditController(Controller):
    path = "/v1/audits"
    tags = ["audits"]

    @post(
        "/",
        status_code=HTTP_202_ACCEPTED,
        operation_class=SubmitAuditOperation,
        summary="Submit a checkpoint for audit",
        description="202: a new audit is queued. 200 (cached: true): an identical earlier request "
        "(same checkpoint, images, labels, options, policy, arch, vitaudit version and "
        "analysis code) answers it; no new job. Never a deleted or failed audit, nor a report "
        "written by a worker running other analysis code than this API.",
        responses={
            200: ResponseSpec(AuditCreated, description="an identical earlier audit (no new job)"),
            **problem_responses(403, 404, 413, 415, 422, 429, 507),
        },
        request_max_body_size=None,
    )
    async def submit(
        self,
        request: Request[Any, Any, State],
        settings: NamedDependency[Settings],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> Response[AuditCreated]:
        """202 with a new queued audit; 200 with the earlier audit when an identical request
        (same checkpoint, images, labels, options, policy, arch, vitaudit version and analysis
        code) was already answered or is still running: no new job."""
        audit_id = new_audit_id()
        bind_audit_id(audit_id)  # the request's log line names the audit it created
        # Held from before admission, so the slot is never counted free while this API lives.
        async with upload_lease(queue.redis, tenant, audit_id):
            return await self._receive(audit_id, request, settings, tenant, store, queue)

    async def _receive(
        self,
        audit_id: str,
        request: Request[Any, Any, State],
        settings: Settings,
        tenant: str,
        store: ArtifactStore,
        queue: AuditQueue,
    ) -> Response[AuditCreated]:
        quota = TenantQuota(queue, store, settings)
        quota.admit(tenant, audit_id)  # 429 before the body is read
        store.ensure()
        folder = store.create_audit(audit_id)
        try:
            length = request.headers.get("content-length")
            form = await receive_form(
                request.headers.get("content-type", ""),
                int(length) if length and length.isdigit() else None,
                request.stream(),
                folder / "inputs",
                max_bytes=settings.max_upload_bytes,
                max_field_bytes=settings.max_form_field_bytes,
                max_images=settings.max_images,
            )
            if "checkpoint_sha256" in form.fields and not form.files_of("checkpoint"):
                # a link (local) or a copy inside the bucket (S3), off the event loop
                known = await anyio.to_thread.run_sync(
                    attach_known_checkpoint,
                    queue.redis,
                    store,
                    tenant,
                    form.fields["checkpoint_sha256"],
                    audit_id,
                    folder / "inputs",
                )
                form.files.append(known)
            record = _request_record(audit_id, tenant, form)
            key = request_key(record)
            reuse = form.fields.get("cache", "true").strip().lower() not in ("false", "0", "no")
            earlier = (
                self._cached(cached_audit(queue.redis, tenant, key), tenant, store, queue)
                if reuse
                else None
            )
            if earlier is not None:
                store.delete_audit(audit_id)
                quota.release(tenant, audit_id)
                bind_audit_id(earlier.id)
                return Response(earlier, status_code=HTTP_200_OK)
            quota.charge(tenant, audit_id, submitted_bytes(folder, form.files))
            # Staged inputs go to the store (S3: an upload; local: already there) before the
            # request, so a worker that sees request.json finds every input.
            await anyio.to_thread.run_sync(store.commit_inputs, audit_id, folder)
            store.write_json(audit_id, "request.json", record)
            queue.enqueue(audit_id)
            queue.redis.zadd(TENANT_INDEX.format(tenant=tenant), {audit_id: time.time()})
            remember_checkpoints(queue.redis, tenant, audit_id, record)
            remember_request(queue.redis, tenant, key, audit_id)
        except BaseException:
            store.delete_audit(audit_id)
            quota.release(tenant, audit_id)
            raise
        created = AuditCreated(
            id=audit_id,
            status="queued",
            checkpoint_sha256=record["checkpoint"]["sha256"],
            links=_links(audit_id),
        )
        return Response(created, status_code=HTTP_202_ACCEPTED)

    def _cached(
        self, audit_id: str | None, tenant: str, store: ArtifactStore, queue: AuditQueue
    ) -> AuditCreated | None:
        """The earlier audit answering the same request, unless it was deleted or failed, or
        its report was written by a worker running other analysis code."""
        record = store.read_json(audit_id, "request.json") if audit_id is not None else None
        if audit_id is None or record is None or record.get("tenant") != tenant:
            return None
        state = audit_state(audit_id, record, store, queue)
        if state.status == "failed":
            return None
        if state.status == "finished" and not report_is_reusable(
            record, store.read_json(audit_id, "report.json")
        ):
            return None  # written by a worker running other analysis code
        return AuditCreated(
            id=audit_id,
            status=state.status,
            checkpoint_sha256=state.checkpoint_sha256,
            links=_links(audit_id),
            cached=True,
        )

    @get("/", summary="The tenant's recent audits, newest first", responses=problem_responses())
    async def list_audits(
        self,
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
        limit: FromQuery[int] = 50,
    ) -> list[AuditState]:
        if not 1 <= limit <= 500:
            raise InvalidRequest("limit must be between 1 and 500")
        return recent_states(tenant, store, queue, limit)

    @get(
        "/{audit_id:str}",
        summary="Status, progress and timings of an audit",
        responses=problem_responses(404),
    )
    async def status(
        self,
        audit_id: FromPath[str],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> AuditState:
        record = owned_record(audit_id, tenant, store)
        return audit_state(audit_id, record, store, queue)

    @get(
        "/{audit_id:str}/report",
        summary="The report JSON (409 until the audit finished)",
        description="Typed by the report contract; the same JSON Schema is served at "
        "/v1/schema/report for validating stored reports offline.",
        responses={
            200: ResponseSpec(Report, description="The report", generate_examples=False),
            **problem_responses(404, 409),
        },
    )
    async def report(
        self,
        audit_id: FromPath[str],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> dict[str, Any]:
        record = owned_record(audit_id, tenant, store)
        return finished_report(audit_id, record, store, queue)

    @get(
        "/{audit_id:str}/artifacts",
        summary="Names of the files the audit wrote",
        responses=problem_responses(404),
    )
    async def artifacts(
        self,
        audit_id: FromPath[str],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
    ) -> ArtifactList:
        owned_record(audit_id, tenant, store)
        return ArtifactList(id=audit_id, artifacts=store.list_artifacts(audit_id))

    @get(
        "/{audit_id:str}/artifacts/{name:str}",
        summary="One file the audit wrote",
        description="PNG plots (image/png), NumPy arrays (.npy, application/octet-stream), the "
        "HTML report (text/html) and JSON documents (report.json, step-*.json: application/json; "
        "declared as a binary download so that generated clients return their bytes).",
        operation_class=ArtifactOperation,
        responses=problem_responses(404),
    )
    async def artifact(
        self,
        audit_id: FromPath[str],
        name: FromPath[str],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
    ) -> File:
        owned_record(audit_id, tenant, store)
        if isinstance(store, LocalStore):
            path = store.artifact_path(audit_id, name)
            if path is None:
                raise NotFound(f"audit '{audit_id}' has no artifact '{name}'")
            return File(path=path, filename=name, content_disposition_type="inline")
        body = store.open_artifact(audit_id, name)
        if body is None:
            raise NotFound(f"audit '{audit_id}' has no artifact '{name}'")
        # Annotated File so the contract stays one binary download; from an object store the
        # same bytes come as a Stream (File needs a local path), never loaded whole.
        return Stream(  # type: ignore[return-value]
            _chunks(body),
            media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
            headers={"content-disposition": f'inline; filename="{name}"'},
        )

    @delete(
        "/{audit_id:str}",
        status_code=HTTP_204_NO_CONTENT,
        summary="Cancel an audit and delete its files",
        responses=problem_responses(403, 404),
    )
    async def remove(
        self,
        audit_id: FromPath[str],
        settings: NamedDependency[Settings],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> None:
        quota = TenantQuota(queue, store, settings)
        if reclaim_orphan(queue.redis, store, quota, audit_id, tenant=tenant):
            return  # an upload whose API died: it never had a request or a job
        owned_record(audit_id, tenant, store)
        queue.cancel(audit_id)
        store.delete_audit(audit_id)
        quota.release(tenant, audit_id)
        queue.redis.zrem(TENANT_INDEX.format(tenant=tenant), audit_id)
