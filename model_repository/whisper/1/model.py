"""`whisper`: audio (encoded bytes or 16 kHz PCM) -> whisper.transcribe's text, language and segments.

execute() only validates requests and queues them; a worker thread advances every queued transcription by
one 30 s window per step (trident_serving.asr.Scheduler: one encoder and one decoder batch for all of them)
and answers each request through its response sender as soon as it is finished. The model stays
non-decoupled, so HTTP and plain gRPC clients work: execute returns None and every request gets exactly one
response, sent with the FINAL flag, from whichever thread finishes it.
"""
import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
import whisper

from trident_serving import triton
from trident_serving.asr import ASROptions, Scheduler
from trident_serving.audio import SAMPLE_RATE, check_pcm, decode_audio
from trident_serving.errors import InvalidInput

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        name = triton.parameters(args).get("checkpoint", "")
        checkpoint = os.path.join(args["model_repository"], args["model_version"], name)
        if not name or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"whisper checkpoint {checkpoint!r} not found: run `python -m export whisper`")
        model = whisper.load_model(checkpoint, device=triton.device(args))
        self.scheduler = Scheduler(model, max_batch=config["max_batch_size"])  # fp16 on GPU, fp32 on CPU
        self.max_queued = 4 * config["max_batch_size"]  # beyond this, requests wait in Triton's queue
        self.changed = threading.Condition()
        self.stopping = False
        self.warm_up()
        self.worker = threading.Thread(target=self.run, name="whisper-scheduler", daemon=True)
        self.worker.start()

    def warm_up(self):
        """One short window with language detection, so the first request does not pay for kernel set-up."""
        self.scheduler.add(np.zeros(SAMPLE_RATE, np.float32), ASROptions(temperatures=(0.0,), sample_len=4))
        while not self.scheduler.idle:
            self.scheduler.step()

    def parse(self, request):
        audio = triton.bytes_input(request, "AUDIO", optional=True)
        pcm = pb_utils.get_input_tensor_by_name(request, "PCM")
        if (audio is None) == (pcm is None):
            raise InvalidInput("send exactly one of AUDIO (an encoded audio file) or PCM (16 kHz mono float32)")
        if audio is not None:
            samples = decode_audio(audio, "AUDIO")
        else:
            array = pcm.as_numpy()
            if array.shape[0] != 1:
                raise InvalidInput(f"PCM must hold one audio per request, got shape {list(array.shape)}")
            samples = check_pcm(array[0], "PCM")
        language = triton.text_input(request, "LANGUAGE", "") or None
        temperature = pb_utils.get_input_tensor_by_name(request, "TEMPERATURE")
        temperatures = ASROptions.temperatures if temperature is None else tuple(temperature.as_numpy().ravel().tolist())
        return samples, ASROptions(language=language, task=triton.text_input(request, "TASK", "transcribe"),
                                   temperatures=temperatures)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                samples, options = self.parse(request)
                with self.changed:  # back-pressure: leave the excess in Triton's queue
                    self.changed.wait_for(lambda: len(self.scheduler.jobs) < self.max_queued or self.stopping)
                self.scheduler.add(samples, options, tag=sender)  # raises InvalidInput for a bad LANGUAGE/TASK
            except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
                send(sender, triton.error_response(exc))
            with self.changed:
                self.changed.notify_all()
        return None

    def run(self):
        """The worker: step while there are jobs, answer each one when it finishes."""
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.stopping or not self.scheduler.idle)
                if self.stopping:
                    return
            batch = self.scheduler.jobs[: self.scheduler.max_batch]  # add() only appends: this is the step's batch
            try:
                finished = self.scheduler.step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                self.scheduler.remove(batch)
                finished = []
                for job in batch:
                    send(job.tag, triton.error_response(exc))
            for job in finished:
                try:
                    response = self.response(job)
                except Exception as exc:  # noqa: BLE001
                    response = triton.error_response(exc)
                send(job.tag, response)
            with self.changed:
                self.changed.notify_all()

    def response(self, job):
        result = self.scheduler.result(job)
        return pb_utils.InferenceResponse([
            triton.string_tensor("TEXT", [result["text"]], (1, 1)),
            triton.string_tensor("LANGUAGE", [result["language"]], (1, 1)),
            triton.string_tensor("SEGMENTS", [json.dumps(result["segments"], ensure_ascii=False)], (1, 1)),
        ])

    def finalize(self):
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.worker.join(timeout=60)
        for job in self.scheduler.jobs:
            send(job.tag, triton.error_response(RuntimeError("the whisper model is being unloaded")))


def send(sender, response):
    """Send a request's one and only response; a client that went away must not stop the worker."""
    try:
        sender.send(response, flags=FINAL)
    except Exception as exc:  # noqa: BLE001
        triton.log.warning("could not send a whisper response: %s", exc)
