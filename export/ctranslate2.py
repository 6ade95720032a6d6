"""CTranslate2 Whisper `model.bin` -> openai-whisper checkpoint (`{"dims", "model_state_dict"}`), bit for bit.

The `model.bin` layout (CTranslate2's `src/models/model.cc` reader, binary versions 2 to 6; little-endian):

    uint32 binary_version | string spec_name | uint32 spec_revision | uint32 n_variables
    n_variables x (string name | uint8 rank | rank x uint32 dim | uint8 dtype_id | uint32 n_bytes | bytes)
    uint32 n_aliases | n_aliases x (string alias | string variable_name)          (binary version >= 3)

where a string is a uint16 length (counting a closing NUL) followed by that many bytes, and dtype ids are
0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16 (binary versions < 4 store an item size instead).

Whisper under CTranslate2 (its WhisperSpec, revision 3) holds OpenAI's tensors, renamed, with the attention
input projections fused: self-attention `linear_0` is [query; key; value] stacked along the output dimension,
cross-attention `linear_1` is [key; value]. The fused bias carries zeros for the key, whose projection has no
bias in openai-whisper. Scalars (`num_heads`, `pre_norm`, `activation`, ...) describe the architecture and are
checked, not converted. `decoder/projection/weight` is an alias of the token embedding, which openai-whisper also
shares with its output projection. Values are copied as stored (float16 stays float16, bit for bit).
"""
from __future__ import annotations

import base64
import gzip
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# dtype id -> (torch dtype, item size); ids as in CTranslate2's DataType enum.
DTYPES = {0: (torch.float32, 4), 1: (torch.int8, 1), 2: (torch.int16, 2), 3: (torch.int32, 4),
          4: (torch.float16, 2), 5: (torch.bfloat16, 2)}
ITEM_SIZES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # binary versions < 4
SUPPORTED_VERSIONS = range(2, 7)  # 2 introduced the spec name; 6 is the newest CTranslate2 writes
WHISPER_SPEC = "WhisperSpec"
# The architecture scalars CTranslate2 stores for Whisper and the values openai-whisper's model implies.
ACTIVATION_GELU = 3
EXPECTED_FLAGS = {"decoder/activation": ACTIVATION_GELU, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0,
                  "decoder/alibi": 0, "decoder/start_from_zero_embedding": 0,
                  # written by newer CTranslate2 releases (4.x), e.g. by to_ctranslate2 below
                  "decoder/alibi_use_positive_positions": 0, "decoder/scale_alibi": 0}
# Legacy scalars CTranslate2's converters still write (alignment now lives in config.json): ignored.
IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer"}


# Special tokens that Hugging Face's Whisper tokenizer (whence CTranslate2's vocabulary) names differently.
SYNONYMS = {"<|nocaptions|>": "<|nospeech|>"}


class ConversionError(ValueError):
    """The file is not a complete CTranslate2 Whisper model this converter can map."""


@dataclass
class CT2Model:
    """The parsed contents of a CTranslate2 `model.bin`."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    """Sequential little-endian reads over a byte buffer that name what was being read when it ends early."""

    def __init__(self, data: bytearray, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ConversionError(
                f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, but the file ends at "
                f"{len(self.data)} bytes (an incomplete download or a missing part?)")
        view = memoryview(self.data)[self.pos:self.pos + n]
        self.pos += n
        return view

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.uint("H", what)
        raw = bytes(self.take(length, what))
        if length == 0 or raw[-1] != 0:
            raise ConversionError(f"{self.path}: malformed string for {what} at offset {self.pos - length}")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise ConversionError(f"{self.path}: {what} at offset {self.pos - length} is not text") from None


def read_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (any spec) into named tensors; raise ConversionError on a bad file."""
    path = Path(path)
    data = bytearray(path.read_bytes())  # writable, so torch.frombuffer can share it without a copy
    reader = _Reader(data, path)
    version = reader.uint("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise ConversionError(
            f"{path} is not a CTranslate2 model.bin this converter reads: its first 4 bytes give binary version "
            f"{version}, expected {SUPPORTED_VERSIONS.start} to {SUPPORTED_VERSIONS.stop - 1}")
    spec = reader.string("the spec name")
    revision = reader.uint("I", "the spec revision")
    variables: dict[str, torch.Tensor] = {}
    for index in range(reader.uint("I", "the variable count")):
        name = reader.string(f"the name of variable {index}")
        rank = reader.uint("B", f"the rank of {name}")
        shape = tuple(reader.uint("I", f"the shape of {name}") for _ in range(rank))
        if version >= 4:
            type_id = reader.uint("B", f"the dtype of {name}")
            if type_id not in DTYPES:
                raise ConversionError(f"{path}: variable {name} has unknown dtype id {type_id}")
            dtype, item_size = DTYPES[type_id]
            n_bytes = reader.uint("I", f"the size of {name}")
        else:
            item_size = reader.uint("B", f"the item size of {name}")
            if item_size not in ITEM_SIZES:
                raise ConversionError(f"{path}: variable {name} has unknown item size {item_size}")
            dtype = ITEM_SIZES[item_size]
            n_bytes = reader.uint("I", f"the size of {name}") * item_size
        count = int(np.prod(shape, dtype=np.int64))
        if n_bytes != count * item_size:
            raise ConversionError(f"{path}: variable {name} of shape {list(shape)} declares {n_bytes} bytes, "
                                  f"expected {count * item_size}")
        start = reader.pos
        reader.take(n_bytes, f"the values of {name}")
        variables[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=start) if count
                           else torch.empty(0, dtype=dtype)).reshape(shape)
    aliases = {}
    if version >= 3:
        for index in range(reader.uint("I", "the alias count")):
            alias = reader.string(f"alias {index}")
            aliases[alias] = reader.string(f"the target of alias {alias}")
    if reader.pos != len(data):
        raise ConversionError(f"{path}: {len(data) - reader.pos} unexpected bytes after the last record "
                              f"(at offset {reader.pos}): not a model.bin as CTranslate2 writes it")
    return CT2Model(version, spec, revision, variables, aliases)


def _split(tensor: torch.Tensor, parts: int, name: str) -> tuple[torch.Tensor, ...]:
    """Split a fused projection along its output dimension into `parts` equal pieces."""
    if tensor.shape[0] % parts:
        raise ConversionError(f"{name}: cannot split {tensor.shape[0]} output rows into {parts} projections")
    return torch.chunk(tensor, parts, dim=0)


class _Mapper:
    """Moves CTranslate2 variables into an openai-whisper state dict, tracking what has been consumed."""

    def __init__(self, model: CT2Model):
        self.source = model.variables
        self.unused = set(model.variables)
        self.state: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.source:
            raise ConversionError(f"variable {name} is missing: not a complete Whisper model")
        self.unused.discard(name)
        return self.source[name]

    def scalar(self, name: str) -> int:
        value = self.get(name)
        if value.numel() != 1:
            raise ConversionError(f"variable {name} should be a scalar, has shape {list(value.shape)}")
        return int(value.item())

    def move(self, source: str, targets: tuple[str | None, ...]) -> None:
        """One variable -> its openai-whisper tensor(s): a fused projection is split along its output rows
        (None: a key bias, which openai-whisper does not have)."""
        tensor = self.get(source)
        pieces = _split(tensor, len(targets), source) if len(targets) > 1 else (tensor,)
        for target, piece in zip(targets, pieces):
            if target is not None:
                self.state[target] = piece.clone()  # own storage, independent of the file buffer


# A CTranslate2 variable and the openai-whisper tensors it holds, stacked along its first dimension.
Link = tuple[str, tuple["str | None", ...]]


def whisper_links(n_audio_layer: int, n_text_layer: int) -> list[Link]:
    """Every variable of CTranslate2's WhisperSpec and its openai-whisper tensors, for both directions.

    The attention input projections are fused: self-attention `linear_0` is [query; key; value], cross-attention
    `linear_1` is [key; value]. Their fused bias carries zeros for the key (None here), whose projection has no bias
    in openai-whisper: the key bias CTranslate2 stores cannot change attention even when non-zero (it adds q.b_k
    to every score of a query alike, which softmax cancels)."""
    links: list[Link] = []

    def layer_norm(src: str, dst: str) -> None:
        links.extend([(f"{src}/gamma", (f"{dst}.weight",)), (f"{src}/beta", (f"{dst}.bias",))])

    def linear(src: str, *dsts: str) -> None:
        links.append((f"{src}/weight", tuple(f"{d}.weight" for d in dsts)))
        links.append((f"{src}/bias", tuple(None if d.endswith(".key") else f"{d}.bias" for d in dsts)))

    def block(src: str, dst: str, cross_attention: bool) -> None:
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        linear(f"{src}/self_attention/linear_0", f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value")
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        if cross_attention:
            layer_norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
            linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
            linear(f"{src}/attention/linear_1", f"{dst}.cross_attn.key", f"{dst}.cross_attn.value")
            linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    links.append(("encoder/position_encodings/encodings", ("encoder.positional_embedding",)))
    for i in range(n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross_attention=False)
    layer_norm("encoder/layer_norm", "encoder.ln_post")
    links.append(("decoder/embeddings/weight", ("decoder.token_embedding.weight",)))
    links.append(("decoder/position_encodings/encodings", ("decoder.positional_embedding",)))
    for i in range(n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross_attention=True)
    layer_norm("decoder/layer_norm", "decoder.ln")
    return links


def count_layers(names: set[str], prefix: str) -> int:
    """Number of `prefix/layer_<i>/...` blocks, checking they are numbered 0..n-1."""
    found = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"/layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise ConversionError(f"{prefix} layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def to_whisper_checkpoint(model: CT2Model, alignment_heads: list[list[int]] | None = None) -> dict:
    """Map a parsed CTranslate2 Whisper model onto openai-whisper's checkpoint: {"dims", "model_state_dict"}.

    Dimensions come from the tensors; every variable must be used and every openai-whisper parameter filled
    with the shape openai-whisper expects. `alignment_heads` ([layer, head] pairs from config.json), when
    given, are stored as `checkpoint["alignment_heads"]` in the form `Whisper.set_alignment_heads` takes
    (whisper.load_model does not read them from a file, trident_serving.asr.load_model does; only word
    timestamps use them)."""
    if model.spec != WHISPER_SPEC:
        raise ConversionError(f"this is a CTranslate2 {model.spec!r} model, not Whisper ({WHISPER_SPEC})")
    quantized = sorted(n for n, v in model.variables.items()
                       if n.endswith("_scale") or v.dtype in (torch.int8, torch.int16) and v.dim() >= 2)
    if quantized:
        raise ConversionError(f"the model is quantized ({quantized[0]}, ...): its original float weights cannot "
                              "be recovered exactly; convert a float16 or float32 CTranslate2 model instead")
    aliases = dict(model.aliases)
    if aliases.pop("decoder/projection/weight", None) != "decoder/embeddings/weight":
        raise ConversionError("the output projection is not tied to the token embedding, unlike openai-whisper")
    # Any other alias names a variable saved once for several equal ones (CTranslate2's optimize(): e.g. the
    # layer norms of freshly initialised weights): each gets the values of the one it names.
    missing = {alias: target for alias, target in aliases.items() if target not in model.variables}
    if missing:
        raise ConversionError(f"aliases of variables the file does not hold: {missing}")
    model = CT2Model(model.binary_version, model.spec, model.revision,
                     {**model.variables, **{alias: model.variables[target] for alias, target in aliases.items()}})
    m = _Mapper(model)
    names = set(model.variables)
    n_audio_layer, n_text_layer = count_layers(names, "encoder"), count_layers(names, "decoder")
    for name, expected in EXPECTED_FLAGS.items():
        if name in model.variables and m.scalar(name) != expected:
            raise ConversionError(f"{name} is {m.scalar(name)}, openai-whisper's architecture needs {expected}")
    m.unused -= IGNORED
    for source, targets in whisper_links(n_audio_layer, n_text_layer):
        m.move(source, targets)

    n_audio_head, n_text_head = m.scalar("encoder/num_heads"), m.scalar("decoder/num_heads")
    if m.unused:
        raise ConversionError(f"variables with no openai-whisper counterpart: {sorted(m.unused)[:5]}")
    state = m.state
    dims = {
        "n_mels": state["encoder.conv1.weight"].shape[1],
        "n_audio_ctx": state["encoder.positional_embedding"].shape[0],
        "n_audio_state": state["encoder.conv1.weight"].shape[0],
        "n_audio_head": n_audio_head,
        "n_audio_layer": n_audio_layer,
        "n_vocab": state["decoder.token_embedding.weight"].shape[0],
        "n_text_ctx": state["decoder.positional_embedding"].shape[0],
        "n_text_state": state["decoder.token_embedding.weight"].shape[1],
        "n_text_head": n_text_head,
        "n_text_layer": n_text_layer,
    }
    _check_against_whisper(dims, state)
    checkpoint = {"dims": dims, "model_state_dict": state}
    if alignment_heads:
        from trident_serving.asr import ALIGNMENT_HEADS_KEY

        checkpoint[ALIGNMENT_HEADS_KEY] = encode_alignment_heads(alignment_heads, n_text_layer, n_text_head)
    return checkpoint


def _check_against_whisper(dims: dict, state: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer of openai-whisper's model of `dims` is present with its exact shape."""
    from whisper.model import AudioEncoder, TextDecoder

    d = dims
    # Whisper's own parts on the meta device: shapes only, no memory (Whisper() itself makes a sparse buffer,
    # which the meta device lacks, for its non-persistent alignment heads).
    with torch.device("meta"):
        encoder = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
        decoder = TextDecoder(d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"], d["n_text_layer"])
    expected = {f"{prefix}.{name}": tensor for prefix, part in (("encoder", encoder), ("decoder", decoder))
                for name, tensor in part.state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ConversionError(f"state dict mismatch with openai-whisper: missing {missing[:5]}, extra {extra[:5]}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConversionError(f"{name}: shape {list(state[name].shape)}, openai-whisper expects "
                                  f"{list(tensor.shape)}")


def encode_alignment_heads(heads: list[list[int]], n_layers: int, n_heads: int) -> bytes:
    """[layer, head] pairs -> the base85(gzip(bool mask)) bytes `Whisper.set_alignment_heads` decodes."""
    mask = np.zeros((n_layers, n_heads), dtype=bool)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ConversionError(f"alignment head {[layer, head]} outside {n_layers} layers x {n_heads} heads")
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))


def whisper_tokenizer(n_vocab: int):
    """openai-whisper's tokenizer of a model with `n_vocab` tokens (multilingual from 51865, with the languages
    the rest make room for)."""
    from whisper.tokenizer import get_tokenizer

    multilingual = n_vocab >= 51865
    return get_tokenizer(multilingual, num_languages=n_vocab - 51765 - int(multilingual))


def openai_vocabulary(n_vocab: int) -> dict[int, str]:
    """openai-whisper's tokens by id, in GPT-2's byte-to-unicode spelling (CTranslate2's vocabulary keeps it;
    tiktoken's ranks are raw bytes), special tokens included."""
    encoding = whisper_tokenizer(n_vocab).encoding
    spelling = _byte_spelling()
    tokens = {rank: "".join(spelling[b] for b in token) for token, rank in encoding._mergeable_ranks.items()}
    tokens.update({rank: token for token, rank in encoding._special_tokens.items()})
    return tokens


def check_vocabulary(path: Path, n_vocab: int) -> None:
    """The CTranslate2 vocabulary must give every id the token openai-whisper's tokenizer gives it.

    Both are compared in full, special tokens included, so that decoded ids mean the same text."""
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if len(tokens) != n_vocab:
        raise ConversionError(f"{path} has {len(tokens)} tokens, the embedding has {n_vocab} rows")
    expected = openai_vocabulary(n_vocab)
    wrong = [i for i, token in enumerate(tokens) if i in expected and expected[i] != SYNONYMS.get(token, token)]
    if wrong:
        i = wrong[0]
        raise ConversionError(f"{path}: {len(wrong)} tokens differ from openai-whisper's tokenizer, e.g. id {i} is "
                              f"{tokens[i]!r} there and {expected[i]!r} in openai-whisper")


def _byte_spelling() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def convert(model_dir: str | Path, output: str | Path) -> dict:
    """Convert the CTranslate2 Whisper model in `model_dir` (model.bin [+ config.json, vocabulary.txt]) into an
    openai-whisper checkpoint at `output`; return its dims."""
    model_dir = Path(model_dir)
    binary = model_dir / "model.bin"
    if not binary.is_file():
        raise ConversionError(f"{model_dir} has no model.bin (a CTranslate2 model directory holds model.bin, "
                              "config.json and vocabulary.txt)")
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    checkpoint = to_whisper_checkpoint(read_model(binary), config.get("alignment_heads"))
    vocabulary = model_dir / "vocabulary.txt"
    if vocabulary.is_file():
        check_vocabulary(vocabulary, checkpoint["dims"]["n_vocab"])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".part")
    torch.save(checkpoint, partial)
    partial.rename(output)
    return checkpoint["dims"]


# -- the other way: openai-whisper checkpoint -> CTranslate2 model folder, through CTranslate2's own WhisperSpec --

def decode_alignment_heads(encoded: bytes, n_layers: int, n_heads: int) -> list[list[int]]:
    """The inverse of `encode_alignment_heads`: [layer, head] pairs."""
    mask = np.frombuffer(gzip.decompress(base64.b85decode(encoded)), dtype=bool).reshape(n_layers, n_heads)
    return [[int(layer), int(head)] for layer, head in zip(*np.nonzero(mask))]


def to_ctranslate2(checkpoint: dict, output: str | Path) -> None:
    """Write the openai-whisper `checkpoint` ({"dims", "model_state_dict"} [+ "alignment_heads"]) as a CTranslate2
    model folder: model.bin, config.json and vocabulary.json, saved by CTranslate2's WhisperSpec (its own writer;
    values as stored, float16 stays float16). config.json is what CTranslate2's Transformers converter writes for
    the same model: suppressed tokens, language ids, alignment heads (default: every head of the decoder's last
    half, as there)."""
    from ctranslate2.specs import whisper_spec
    from ctranslate2.specs.model_spec import index_spec

    from trident_serving.asr import ALIGNMENT_HEADS_KEY

    dims, state = checkpoint["dims"], checkpoint["model_state_dict"]
    spec = whisper_spec.WhisperSpec(dims["n_audio_layer"], dims["n_audio_head"], dims["n_text_layer"],
                                    dims["n_text_head"])
    for name, sources in whisper_links(dims["n_audio_layer"], dims["n_text_layer"]):
        parts = [state[source] if source is not None else None for source in sources]
        rows = next(part for part in parts if part is not None)  # a key bias: zeros shaped as its neighbour's
        tensor = torch.cat([part if part is not None else torch.zeros_like(rows) for part in parts]) \
            if len(parts) > 1 else parts[0]
        scope, attribute = name.rsplit("/", 1)
        setattr(index_spec(spec, scope), attribute, tensor.contiguous())
    # tied output projection: the same tensor, which CTranslate2 saves as an alias of the embedding
    spec.decoder.projection.weight = spec.decoder.embeddings.weight
    tokenizer = whisper_tokenizer(dims["n_vocab"])
    tokens = openai_vocabulary(dims["n_vocab"])
    spelled = {token: hf for hf, token in SYNONYMS.items()}  # Hugging Face's names, which CTranslate2 reads
    spec.register_vocabulary([spelled.get(tokens[i], tokens[i]) for i in range(dims["n_vocab"])])
    heads = checkpoint.get(ALIGNMENT_HEADS_KEY)
    n_layers, n_heads = dims["n_text_layer"], dims["n_text_head"]
    config = spec.config
    config.alignment_heads = decode_alignment_heads(heads, n_layers, n_heads) if heads is not None else \
        [[layer, head] for layer in range(n_layers // 2, n_layers) for head in range(n_heads)]
    config.suppress_ids = sorted({*tokenizer.non_speech_tokens, tokenizer.sot, tokenizer.translate,
                                  tokenizer.transcribe, tokenizer.sot_lm, tokenizer.sot_prev, tokenizer.no_speech})
    config.suppress_ids_begin = [*tokenizer.encode(" "), tokenizer.eot]
    config.lang_ids = sorted(tokenizer.all_language_tokens) if tokenizer.language is not None else []
    spec.validate()
    spec.optimize(quantization=None)  # aliases only: the compute type is chosen when the model is loaded
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    spec.save(str(output))
