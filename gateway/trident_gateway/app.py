"""The FastAPI application: /v1/detect, /v1/transcribe, /v1/ocr, health, readiness and metrics."""

import asyncio
import math
from contextlib import asynccontextmanager
from typing import Annotated, Any, Awaitable, Literal, Optional, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from swagger_ui_bundle import swagger_ui_path

import trident.aio
from trident.analyze.results import Options as AnalysisOptions
from trident.errors import TridentError

from . import errors
from .config import Settings
from .errors import ApiError, error_response
from .jobs import FORMATS, JobRunner
from .keys import KeyStore
from .observe import Metrics, Observe
from .spool import save_upload
from .uploads import read_upload

Options = TypeVar("Options", bound=BaseModel)
DOCS_ASSETS = "/docs/assets"  # Swagger UI's files
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
ERRORS = {status: {"description": text} for status, text in {
    400: "invalid input (the model's message) or parameters", 401: "no API key", 403: "unknown or revoked key",
    408: "the body stalled (nothing sent for --body-timeout)", 413: "body over the endpoint's limit",
    502: "Triton failed", 503: "Triton unavailable or its queue full", 504: "Triton timed out"}.items()}
JOB_ERRORS = {404: {"description": "no such job (or another key's)"},
              409: {"description": "the job is not finished, or ended without a result"},
              410: {"description": "the job's files were removed (retention)"}}


def _listed(value: Any) -> Any:
    """One temperature as a schedule of one: `?temperature=0` and a repeated field mean the same."""
    return [value] if isinstance(value, (str, int, float)) else value


Temperatures = Annotated[Optional[list[float]], BeforeValidator(_listed)]


class DetectOptions(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    conf: Optional[float] = Field(None, ge=0, le=1, description="confidence threshold (model default if unset)")
    iou: Optional[float] = Field(None, ge=0, le=1, description="NMS IoU threshold (model default if unset)")


class TranscribeOptions(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    language: Optional[str] = Field(None, max_length=32, description="e.g. en, ko; detected if unset")
    task: Literal["transcribe", "translate"] = "transcribe"
    temperature: Temperatures = Field(
        None, description="decoding temperature; repeat it for a fallback schedule (e.g. 0, 0.2, 0.4)")
    word_timestamps: bool = False


class AnalyzeOptions(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    fps: Optional[float] = Field(None, gt=0, le=60, description="video frames analysed per second (default 1)")
    scenes: bool = Field(False, description="one frame per scene instead of a fixed rate (not with fps)")
    language: Optional[str] = Field(None, max_length=32, description="spoken language, e.g. en; detected if unset")
    temperature: Temperatures = Field(
        None, description="Whisper's temperatures (0 alone: greedy, the same every run); repeat for a schedule")
    filename: Optional[str] = Field(None, max_length=255, description="the file's name with a raw body: its "
                                                                      "extension tells video, audio and image apart")

    @model_validator(mode="after")
    def _one_sampling(self) -> "AnalyzeOptions":
        if self.fps is not None and self.scenes:
            raise ValueError("sample frames either at a fixed rate (fps) or per scene, not both")
        return self

    def pipeline(self) -> AnalysisOptions:
        """The media pipeline's options (as `trident analyze`: one frame a second unless told otherwise)."""
        fps = None if self.scenes else (1.0 if self.fps is None else self.fps)
        return AnalysisOptions(fps=fps, scenes=self.scenes, language=self.language, temperature=self.temperature)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _merge(model: type[Options], query: Options, fields: dict) -> Options:
    """The options of the query string, overridden by the multipart form's fields of the same name."""
    try:
        return model.model_validate({**query.model_dump(exclude_unset=True), **fields})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, "invalid_parameter", problems) from None


def create_app(settings: Settings) -> FastAPI:
    """The gateway for `settings` (checked: no keys file and auth on is refused)."""
    settings.check()
    keys = KeyStore(settings.keys_file) if settings.auth else None
    metrics = Metrics()
    jobs = JobRunner(settings) if settings.jobs else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One client, so every request shares one gRPC channel (HTTP/2 streams over one connection).
        app.state.client = trident.aio.Client(settings.triton, protocol="grpc", timeout=settings.timeout,
                                              **settings.client_options())
        if jobs is not None:
            await jobs.start()
        try:
            yield
        finally:
            if jobs is not None:
                await jobs.stop()
            await app.state.client.close()

    # docs_url/redoc_url None: FastAPI's own pages load Swagger UI from a CDN; /docs below serves it from the
    # pinned swagger-ui-bundle-v2 package instead, so the docs work where the gateway runs offline.
    app = FastAPI(title="Trident REST API", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Object detection (YOLOv8), speech recognition (Whisper) and OCR (EasyOCR) served "
                              "by Triton. Send a file as multipart field `file` or as the raw body.")
    errors.install(app)
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")
    app.add_middleware(Observe, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    bearer = HTTPBearer(auto_error=False, description="an API key from `python -m trident_gateway keys create`")

    def require_key(request: Request,
                    credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]) -> None:
        if keys is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise ApiError(401, "unauthorized", "an API key is required: Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})
        entry = keys.lookup(credentials.credentials)
        if entry is None or entry.revoked:
            raise ApiError(403, "forbidden", "unknown or revoked API key")
        request.state.key_name = entry.name

    async def ask(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except TridentError as exc:
            raise errors.from_trident(exc, settings.retry_after) from exc

    def answer(result: Any) -> JSONResponse:
        return JSONResponse(_finite(result))

    v1 = dict(dependencies=[Depends(require_key)], openapi_extra=UPLOAD_BODY, responses=ERRORS)

    @app.post("/v1/detect", tags=["models"], **v1)
    async def detect(request: Request, query: Annotated[DetectOptions, Query()]) -> JSONResponse:
        """Objects in an image: `{"detections": [{"box": [x1, y1, x2, y2], "score", "class_id", "label"}]}`."""
        data, fields = await read_upload(request, settings.max_image_bytes, settings.body_timeout)
        options = _merge(DetectOptions, query, fields)
        result = await ask(request.app.state.client.detect(data, options.conf, options.iou))
        return answer(result.to_dict())

    @app.post("/v1/transcribe", tags=["models"], **v1)
    async def transcribe(request: Request, query: Annotated[TranscribeOptions, Query()]) -> JSONResponse:
        """Speech in an audio file: `{"text", "language", "segments": [...]}`."""
        data, fields = await read_upload(request, settings.max_audio_bytes, settings.body_timeout)
        options = _merge(TranscribeOptions, query, fields)
        temperature = options.temperature
        if temperature is not None and len(temperature) == 1:
            temperature = temperature[0]
        result = await ask(request.app.state.client.transcribe(
            data, options.language, options.task, temperature, options.word_timestamps))
        return answer(result.to_dict())

    @app.post("/v1/ocr", tags=["models"], **v1)
    async def ocr(request: Request) -> JSONResponse:
        """Text lines in an image, in reading order: `[{"box": [[x, y] x4], "text", "score"}]`."""
        data, _ = await read_upload(request, settings.max_image_bytes, settings.body_timeout)
        lines = await ask(request.app.state.client.read_text(data))
        return answer([line.to_dict() for line in lines])

    def owner(request: Request) -> Optional[str]:
        """Whose jobs the caller sees: its key's name; None (every job) with auth off."""
        return getattr(request.state, "key_name", None)

    def require_jobs() -> None:
        if jobs is None:
            raise ApiError(404, "jobs_not_served", "analysis jobs are served by another gateway: send /v1/analyze "
                                                   "and /v1/jobs there (in Kubernetes the Ingress routes them)")

    job_route = [Depends(require_key), Depends(require_jobs)]
    jobs_v1 = dict(dependencies=job_route, responses=JOB_ERRORS)

    @app.post("/v1/analyze", tags=["jobs"], status_code=202, dependencies=job_route,
              openapi_extra=UPLOAD_BODY, responses={**ERRORS, 415: {"description": "not a media file by its name"}})
    async def analyze(request: Request, query: Annotated[AnalyzeOptions, Query()]) -> JSONResponse:
        """Start an analysis job on a video, audio file or image (as `trident analyze`: transcript, objects and
        on-screen text). Answers 202 with the job; follow `Location` (`GET /v1/jobs/{id}`)."""
        job_id, directory = jobs.new_directory()
        try:
            upload, fields = await save_upload(request, directory, settings.max_video_bytes, query.filename,
                                                  settings.body_timeout)
            options = _merge(AnalyzeOptions, query, fields)
        except BaseException:
            await jobs.discard(job_id)
            raise
        job = jobs.submit(job_id, owner(request), upload, options.pipeline())
        return JSONResponse({key: value for key, value in jobs.view(job).items() if key in ("id", "status", "links")},
                            status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], **jobs_v1)
    async def job_status(request: Request, job_id: str) -> JSONResponse:
        """A job: `status` (queued, running, succeeded, failed, cancelled), `progress`, `error`, its times."""
        return JSONResponse(jobs.view(jobs.owned(job_id, owner(request))))

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"], response_class=FileResponse, **jobs_v1)
    async def job_result(request: Request, job_id: str,
                         format: Annotated[Literal["json", "srt", "vtt", "html"], Query()] = "json") -> Response:
        """A finished job's result: analysis.json, SRT or WebVTT subtitles, or the HTML report."""
        path = jobs.result(jobs.owned(job_id, owner(request)), format)
        # the report's own script may run, but sandboxed: not with the API's origin
        headers = {"Content-Security-Policy": "sandbox allow-scripts"} if format == "html" else None
        return FileResponse(path, media_type=FORMATS[format], headers=headers)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], **jobs_v1)
    async def job_delete(request: Request, job_id: str) -> JSONResponse:
        """Cancel a queued or running job (it stops within moments) and remove its files; the job stays listed."""
        return JSONResponse(jobs.view(await jobs.cancel(jobs.owned(job_id, owner(request)))))

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        """The gateway process is alive (Triton is not asked)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses={503: {"description": "Triton or a model is not ready"}})
    async def readyz(request: Request) -> JSONResponse:
        """Triton is ready and every model of its repository is READY."""
        retry = {"Retry-After": str(settings.retry_after)}
        try:
            health = await asyncio.wait_for(request.app.state.client.health(), settings.ready_timeout)
        except (TridentError, asyncio.TimeoutError) as exc:
            return error_response(503, "not_ready", f"Triton at {settings.triton}: {exc or 'no answer'}", retry)
        not_ready = {name: state or "UNKNOWN" for name, state in health["models"].items() if state != "READY"}
        if not health["ready"] or not_ready:
            why = ", ".join(f"{name} is {state}" for name, state in not_ready.items()) or "server not ready"
            return JSONResponse({"error": {"code": "not_ready", "message": why}, "server_ready": health["ready"],
                                 "models": health["models"]}, status_code=503, headers=retry)
        return JSONResponse({"status": "ready", "models": health["models"]})

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics of the gateway."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
