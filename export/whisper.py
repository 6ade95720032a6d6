"""OpenAI Whisper: write a whisper checkpoint (official, local or synthetic) next to the `whisper` model."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .download import CACHE_DIR, fetch
from .repository import (add_common_arguments, resolve_weights, set_instance_kind, set_parameter, stage_model,
                         write_manifest)

# ModelDimensions of the official checkpoints (whisper.load_model(name).dims), for the synthetic weights.
# Fields: n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer,
#         n_vocab, n_text_ctx, n_text_state, n_text_head, n_text_layer
DIMS = {
    "tiny": (80, 1500, 384, 6, 4, 51865, 448, 384, 6, 4),
    "base": (80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6),
    "small": (80, 1500, 768, 12, 12, 51865, 448, 768, 12, 12),
    "medium": (80, 1500, 1024, 16, 24, 51865, 448, 1024, 16, 24),
    "large-v3": (128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32),
    "turbo": (128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 4),
}
DIM_NAMES = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
             "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=tuple(DIMS), default="small", help="Whisper size (default small)")
    add_common_arguments(parser, "'official' (download openai-whisper's checkpoint), 'synthetic' (random weights "
                                 "of the same dimensions) or a local .pt checkpoint")


def run(args: argparse.Namespace) -> None:
    source = resolve_weights(args.weights, official=lambda: official_checkpoint(args.size),
                             synthetic=lambda: synthetic_checkpoint(args.size, args.seed))
    model_dir = stage_model(args.repo, "whisper")
    target = model_dir / "1" / f"whisper-{args.size}.pt"
    shutil.copyfile(source, target)
    config = model_dir / "config.pbtxt"
    set_parameter(config, "checkpoint", target.name)
    set_instance_kind(config, args.kind)
    write_manifest(args.repo, "whisper", {"weights": str(source), "synthetic": args.weights == "synthetic",
                                          "size": args.size, "kind": args.kind})
    print(f"whisper-{args.size} ({args.kind}) written to {target} from {source}")


def official_checkpoint(size: str) -> Path:
    """openai-whisper's checkpoint of `size`, downloaded and SHA-256 checked (its URL embeds the digest)."""
    import whisper

    url = whisper._MODELS[size]
    return fetch(url, filename=f"whisper-{size}.pt", sha256=url.split("/")[-2])


def synthetic_checkpoint(size: str, seed: int) -> Path:
    """A seeded, randomly initialised checkpoint of `size`, in the official {"dims", "model_state_dict"} format."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    path = CACHE_DIR / f"whisper-{size}-synthetic-seed{seed}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        dims = dict(zip(DIM_NAMES, DIMS[size]))
        model = Whisper(ModelDimensions(**dims))  # PyTorch's default initialisation of every layer...
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # ...except this one, left empty
        # fp16 like the official files; whisper.load_model casts back to the model's fp32 parameters.
        state = {k: v.half() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        torch.save({"dims": dims, "model_state_dict": state}, partial)
        partial.rename(path)
    return path
