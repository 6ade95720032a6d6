"""Analysis jobs (/v1/analyze): the media pipeline run in the background on an uploaded file, its state in SQLite.

A job is queued once its upload is on disk, runs when one of `max_jobs` slots frees (the others wait in the order
they came), and ends succeeded, failed or cancelled. Its files live in `<data_dir>/jobs/<id>/` (`input/`, the
upload; `result/`, what `trident analyze` writes: analysis.json, subtitles, report.html) until `job_retention`
after it finished, when a periodic sweep removes them and marks the row expired. The rows stay.

A gateway that stops leaves its rows as they are; the next one to start on the same database resumes the queued
jobs and marks those that were running failed: their run cannot be picked up halfway.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import shutil
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import trident.aio
from trident.analyze import output, pipeline, subtitles
from trident.analyze.results import Options
from trident.errors import TridentError

from .config import Settings
from .errors import ApiError

ACTIVE = ("queued", "running")
RESTARTED = "the gateway restarted while it ran"
FORMATS = {"json": "application/json", "srt": "application/x-subrip", "vtt": "text/vtt",
           "html": "text/html; charset=utf-8"}
PROGRESS_EVERY = 0.5  # seconds between two progress writes of one job: a row update per frame is wasted I/O
CANCEL_WAIT = 10.0  # seconds DELETE waits for a cancelled run to let go of its files
log = logging.getLogger("trident_gateway.jobs")


@dataclass
class Job:
    """One row of the jobs table; times are Unix seconds, `removed` when its files were removed (expired or
    deleted)."""

    id: str
    owner: Optional[str]  # the API key's name; None when auth is off
    status: str  # queued, running, succeeded, failed, cancelled
    filename: str
    options: str  # the pipeline's Options as JSON
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    progress: Optional[float] = None  # 0 to 1 (pipeline.Progress.fraction)
    frames_done: int = 0
    frames_total: Optional[int] = None
    error: Optional[str] = None
    removed: Optional[float] = None


COLUMNS = [f.name for f in fields(Job)]


class JobStore:
    """The jobs table in SQLite, used from the event loop's thread only (each call is one short statement)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, owner TEXT, status TEXT NOT NULL, "
                        "filename TEXT NOT NULL, options TEXT NOT NULL, created REAL NOT NULL, started REAL, "
                        "finished REAL, progress REAL, frames_done INTEGER NOT NULL DEFAULT 0, frames_total INTEGER, "
                        "error TEXT, removed REAL)")

    def add(self, job: Job) -> None:
        self.db.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        [getattr(job, c) for c in COLUMNS])

    def get(self, job_id: str) -> Optional[Job]:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(**row) if row else None

    def update(self, job_id: str, **values: Any) -> None:
        self.db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in values)} WHERE id = ?",
                        [*values.values(), job_id])

    def where(self, condition: str, *args: Any) -> list[Job]:
        return [Job(**row) for row in self.db.execute(f"SELECT * FROM jobs WHERE {condition} ORDER BY created",
                                                      args)]

    def close(self) -> None:
        self.db.close()


def _iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


class JobRunner:
    """Starts (`start`, in the app's lifespan) and stops (`stop`) the jobs of one gateway; the routes call the
    rest."""

    def __init__(self, settings: Settings):
        if settings.max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {settings.max_jobs}")
        self.settings = settings
        self.root = settings.data_dir / "jobs"
        self.tasks: dict[str, asyncio.Task] = {}
        self.store: Optional[JobStore] = None
        self.client: Optional[trident.aio.Client] = None
        self.sweeper: Optional[asyncio.Task] = None
        self.slots: Optional[asyncio.Semaphore] = None

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.settings.jobs_db or self.settings.data_dir / "jobs.sqlite3")
        self.slots = asyncio.Semaphore(self.settings.max_jobs)
        # Its own client: a job's whisper request is a whole soundtrack, longer than the API's per-call timeout.
        self.client = trident.aio.Client(self.settings.triton, protocol="grpc", timeout=self.settings.job_timeout,
                                         **self.settings.client_options())
        now = time.time()
        for job in self.store.where("status = 'running'"):
            self.store.update(job.id, status="failed", error=RESTARTED, finished=now)
        known = {job.id for job in self.store.where("1")}
        for orphan in (d for d in self.root.iterdir() if d.name not in known):  # a crash mid-upload left it
            await asyncio.to_thread(shutil.rmtree, orphan, True)
        for job in self.store.where("status = 'queued'"):
            self._launch(job)
        self.sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Cancel the runs and leave their rows as they are, for the next start to resume or fail."""
        running = [*self.tasks.values(), *([self.sweeper] if self.sweeper else [])]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.store is not None:
            self.store.close()

    # -- the routes' side -----------------------------------------------------------------------------------------

    def new_directory(self) -> tuple[str, Path]:
        """A new job id and the (empty) folder its upload goes into."""
        job_id = uuid.uuid4().hex
        directory = self.root / job_id / "input"
        directory.mkdir(parents=True)
        return job_id, directory

    async def discard(self, job_id: str) -> None:
        """Remove the files of a job that was never submitted (its upload was refused)."""
        await asyncio.to_thread(shutil.rmtree, self.root / job_id, True)

    def submit(self, job_id: str, owner: Optional[str], upload: Path, options: Options) -> Job:
        job = Job(id=job_id, owner=owner, status="queued", filename=upload.name, options=json.dumps(asdict(options)),
                  created=time.time())
        self.store.add(job)
        self._launch(job)
        return job

    def owned(self, job_id: str, owner: Optional[str]) -> Job:
        """The job `job_id` if `owner` (the caller's key name; None with auth off, who sees every job) may see
        it; 404 alike for a job that does not exist and one of another key, which must not learn it exists."""
        job = self.store.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return job

    async def cancel(self, job: Job) -> Job:
        """Cancel `job` if it is queued or running (its run stops within moments), and remove its files."""
        if job.status in ACTIVE:
            self.store.update(job.id, status="cancelled", finished=time.time())
            task = self.tasks.get(job.id)
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=CANCEL_WAIT)
        await self._remove_files(job.id)
        return self.store.get(job.id)

    def result(self, job: Job, format: str) -> Path:
        """The file of `job`'s result in `format`; 409 while it is not finished or when it has none, 410 once its
        files are removed, 404 for subtitles of an input without a transcript."""
        if job.status in ACTIVE:
            raise ApiError(409, "not_finished", f"job {job.id} is {job.status}: its result is not ready",
                           {"Retry-After": "5"})
        if job.removed is not None:
            raise ApiError(410, "expired", f"the files of job {job.id} were removed at {_iso(job.removed)} "
                                           f"(kept {self.settings.job_retention / 3600:g} h after the job ends)")
        folder = self.root / job.id / "result"
        if not (folder / "analysis.json").is_file():
            raise ApiError(409, "no_result", f"job {job.id} {job.status} without a result: {job.error}")
        if format in ("srt", "vtt"):
            subtitle = folder / f"{subtitles.file_stems([job.filename])[0]}.{format}"
            if not subtitle.is_file():
                raise ApiError(404, "no_transcript", f"{job.filename} has no transcript, so no subtitles")
            return subtitle
        return folder / ("analysis.json" if format == "json" else "report.html")

    def view(self, job: Job) -> dict:
        """The job as the API shows it."""
        expires = job.finished + self.settings.job_retention if job.finished and job.removed is None else None
        link = f"/v1/jobs/{job.id}"
        return {"id": job.id, "status": job.status, "filename": job.filename, "options": json.loads(job.options),
                "progress": {"fraction": job.progress, "frames_done": job.frames_done,
                             "frames_total": job.frames_total},
                "error": job.error, "created": _iso(job.created), "started": _iso(job.started),
                "finished": _iso(job.finished), "files_expire": _iso(expires), "files_removed": _iso(job.removed),
                "links": {"self": link, **{format: f"{link}/result?format={format}" for format in FORMATS}}}

    # -- the runs -------------------------------------------------------------------------------------------------

    def _launch(self, job: Job) -> None:
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self.tasks[job.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job.id, None))

    async def _run(self, job: Job) -> None:
        """Wait for a slot, then run the pipeline on the upload and write its outputs. A cancelled run touches no
        row: DELETE has marked it cancelled, or the gateway is stopping (the next start marks it failed)."""
        async with self.slots:
            self.store.update(job.id, status="running", started=time.time())
            upload = self.root / job.id / "input" / job.filename
            try:
                analysis = await pipeline.analyze_async([upload], self.client, Options(**json.loads(job.options)),
                                                        on_progress=self._recorder(job.id))
                analysis.inputs[0].path = job.filename  # the client's name, not where the gateway keeps it
                await _to_the_end(output.write, analysis, self.root / job.id / "result")
            except (TridentError, OSError, ValueError) as exc:
                self._finish(job.id, "failed", f"{type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 (a bug: the job says so, the gateway goes on)
                log.exception("job %s failed", job.id)
                self._finish(job.id, "failed", f"internal error: {type(exc).__name__}: {exc}")
                return
            done = analysis.inputs[0]
            self._finish(job.id, "failed" if done.error else "succeeded", done.error,
                         progress=1.0 if not done.error else None, frames_done=len(done.frames))

    def _recorder(self, job_id: str) -> Callable[[pipeline.Progress], None]:
        """The pipeline's progress callback for `job_id`: writes its row at most every PROGRESS_EVERY seconds."""
        last = [0.0]

        def record(progress: pipeline.Progress) -> None:
            if time.monotonic() - last[0] >= PROGRESS_EVERY:
                last[0] = time.monotonic()
                total = progress.totals["detect"]
                self.store.update(job_id, progress=progress.fraction, frames_done=progress.frames_done,
                                  frames_total=int(total) if total is not None else None)

        return record

    def _finish(self, job_id: str, status: str, error: Optional[str], **values: Any) -> None:
        self.store.update(job_id, status=status, error=error, finished=time.time(), **values)

    async def _remove_files(self, job_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.root / job_id, True)
        self.store.update(job_id, removed=time.time())

    async def sweep(self) -> None:
        """Remove the files of the jobs finished more than `job_retention` ago."""
        cutoff = time.time() - self.settings.job_retention
        for job in self.store.where("removed IS NULL AND finished IS NOT NULL AND finished < ?", cutoff):
            await self._remove_files(job.id)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except (OSError, sqlite3.Error):
                log.exception("the sweep of expired job files failed; trying again later")
            await asyncio.sleep(self.settings.sweep_interval)


async def _to_the_end(function: Callable, *args: Any) -> Any:
    """`function(*args)` in a thread, awaited to its end even when the task is cancelled meanwhile (the
    cancellation is raised after): DELETE removes a job's files only once nothing writes them."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await work
        raise
