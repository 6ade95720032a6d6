"""`whisper`: audio (encoded bytes or 16 kHz PCM) -> whisper.transcribe's text, language and segments.

execute() only validates requests and admits them (trident_serving.asr_service.Transcriber: it waits while the
audio held by admitted requests is at `max_queued_audio_seconds`, leaving the excess in Triton's bounded queue);
a worker thread advances the admitted transcriptions by one 30 s window per step, at most `max_windows_per_step`
windows per step taken round-robin (trident_serving.asr.Scheduler: one encoder and one decoder batch), and answers
each request through its response sender as soon as it is finished, failed or cancelled by its client. The model
stays non-decoupled, so HTTP and plain gRPC clients work: execute returns None and every request gets exactly one
response, sent with the FINAL flag, by the worker (or by execute for a request it did not admit).
"""
import json
import os

import triton_python_backend_utils as pb_utils

from trident_serving import gpu, metrics, triton
from trident_serving.asr import FRAMES_PER_SECOND, ASROptions, load_model
from trident_serving.asr_ct2 import ENGINES, CTranslate2Whisper, scheduler_for
from trident_serving.asr_service import ServiceOptions, Transcriber
from trident_serving.audio import check_pcm, decode_audio
from trident_serving.errors import InvalidInput

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        triton.init_instance(args)
        self.metrics = metrics.ModelMetrics(args, metrics.WHISPER)
        parameters = triton.parameters(args)
        name = parameters.get("checkpoint", "")
        engine = parameters.get("engine", "openai")
        if engine not in ENGINES:
            raise ValueError(f"whisper's engine parameter is {engine!r}: use one of {', '.join(ENGINES)}")
        checkpoint = os.path.join(args["model_repository"], args["model_version"], name)
        if not name or not os.path.exists(checkpoint):
            raise FileNotFoundError(f"whisper checkpoint {checkpoint!r} not found: run `python -m export whisper`")
        options = ServiceOptions.from_parameters(parameters)
        self.max_audio_seconds = options.max_audio_seconds
        device = triton.device(args)
        if engine == "ctranslate2":  # `checkpoint` is the CTranslate2 model folder
            replicas = parameters.get("replicas", "") or "0"
            if not replicas.isdigit():
                raise ValueError(f"whisper parameter replicas must be a whole number (0: one per core), got {replicas!r}")
            model = CTranslate2Whisper(checkpoint, device, compute_type=parameters.get("compute_type", "default"),
                                       replicas=int(replicas))
        else:
            model = load_model(checkpoint)  # with the alignment heads the checkpoint carries (word timestamps)
            if device != "cpu":  # fp16 weights, cast once on the CPU: whisper's casts' numbers, half the memory
                model = gpu.keep_fp16(model).to(device)
        triton.memory_checkpoint("loaded")
        scheduler = scheduler_for(model, max_windows=options.max_windows_per_step)
        compute_type = model.compute_type if engine == "ctranslate2" else "float16" if device != "cpu" else "float32"
        # `trident stats` shows it. Never reset in finalize: a reload starts the new instances before it
        # finalizes the old ones, which share the series.
        self.metrics.mark(metrics.WHISPER_ENGINE, engine=engine, compute_type=compute_type)
        self.transcriber = Transcriber(scheduler, self.respond, options.max_queued_audio_seconds, on_dead=end_stub,
                                       on_step=lambda: metrics.publish_whisper_step(self.metrics, scheduler.stats),
                                       on_admit=lambda: metrics.publish_whisper_queue(self.metrics, scheduler.stats))
        self.transcriber.start()

    def parse(self, request):
        audio = triton.bytes_input(request, "AUDIO", optional=True)
        pcm = pb_utils.get_input_tensor_by_name(request, "PCM")
        if (audio is None) == (pcm is None):
            raise InvalidInput("send exactly one of AUDIO (an encoded audio file) or PCM (16 kHz mono float32)")
        if audio is not None:
            samples = decode_audio(audio, "AUDIO", self.max_audio_seconds)
        else:
            array = pcm.as_numpy()
            if array.shape[0] != 1:
                raise InvalidInput(f"PCM must hold one audio per request, got shape {list(array.shape)}")
            samples = check_pcm(array[0], "PCM", self.max_audio_seconds)
        language = triton.text_input(request, "LANGUAGE", "") or None
        temperature = pb_utils.get_input_tensor_by_name(request, "TEMPERATURE")
        temperatures = ASROptions.temperatures if temperature is None else tuple(temperature.as_numpy().ravel().tolist())
        return samples, ASROptions(language=language, task=triton.text_input(request, "TASK", "transcribe").lower(),
                                   temperatures=temperatures,
                                   word_timestamps=bool(triton.scalar_input(request, "WORD_TIMESTAMPS", 0.0)))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                samples, options = self.parse(request)
                # Waits while the admitted audio is at its limit; raises InvalidInput for a bad LANGUAGE/TASK.
                self.transcriber.submit(samples, options, tag=sender, cancelled=request.is_cancelled)
            except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
                send(sender, triton.error_response(exc))
        return None

    def respond(self, job):
        """Answer a finished job (run by the worker thread)."""
        if job.error is not None:
            send(job.tag, triton.error_response(job.error))
            return
        result = self.transcriber.scheduler.result(job)
        self.metrics.inc(metrics.WHISPER_AUDIO, job.content_frames / FRAMES_PER_SECOND)
        send(job.tag, pb_utils.InferenceResponse([
            triton.string_tensor("TEXT", [result["text"]], (1, 1)),
            triton.string_tensor("LANGUAGE", [result["language"]], (1, 1)),
            triton.string_tensor("SEGMENTS", [json.dumps(result["segments"], ensure_ascii=False)], (1, 1)),
        ]))

    def finalize(self):
        self.transcriber.close()  # the worker answers every unfinished request before it stops


def send(sender, response):
    """Send a request's one and only response; a client that went away must not stop the worker."""
    try:
        sender.send(response, flags=FINAL)
    except Exception as exc:  # noqa: BLE001
        triton.log.warning("could not send a whisper response: %s", exc)


def end_stub(failure):
    """The worker died (every request was answered with UNAVAILABLE): end this stub process, so that Triton
    reports the model's stub as unhealthy and the supervisor reloads the model, instead of a READY model that
    can only refuse requests."""
    triton.log.critical("whisper's worker died (%s): ending the stub so the model is reloaded", failure)
    os._exit(70)
