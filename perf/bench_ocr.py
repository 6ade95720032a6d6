"""Throughput of the served `easyocr` model against EasyOCR's own `Reader.readtext`, on the same images and weights.

    python perf/bench_ocr.py --images 16                      # server already running on localhost
    python perf/bench_ocr.py --start --repository model_repository

Rows: readtext called sequentially in this process (a Reader built from the repository's weights exactly as
the model builds it), then the served model over gRPC at concurrency 1 and 16 (dynamic batching shares the
CRAFT and recogniser passes between concurrent requests). The served results are checked against readtext's.
Images are generated: 1280x720 pages with ~20 text lines of mixed size (`make_page`).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
FONTS = [Path("/usr/share/fonts/truetype/dejavu") / f for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf",
                                                                 "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")]
WORDS = ("triton inference server batches requests from many clients while the detector finds text regions "
         "and the recogniser reads each line invoice total order number 2026 street avenue open daily").split()


@dataclass
class Options:
    url: str = "localhost:8001"
    repository: Path = ROOT / "model_repository"
    images: int = 16
    concurrency: tuple[int, ...] = (1, 16)
    device: str = "auto"
    start: bool = False
    seed: int = 0


def make_page(rng: np.random.Generator, size: tuple[int, int] = (1280, 720), lines: int = 20) -> bytes:
    """A JPEG page with `lines` lines of random words, font sizes 16-30, on a light textured background."""
    width, height = size
    base = rng.integers(215, 250)
    noise = rng.normal(0, 4, (height, width, 1)) + np.array([base, base - 5, base - 12])
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    row_height = height / lines
    for row in range(lines):
        font_size = int(rng.integers(16, 31))
        path = FONTS[int(rng.integers(len(FONTS)))]
        font = ImageFont.truetype(str(path), font_size) if path.exists() else ImageFont.load_default(font_size)
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        x = int(rng.integers(10, width // 3))
        draw.text((x, int(row * row_height) + 2), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 70, 3)))
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return jpeg.tobytes()


def serve_request(client, data: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    import tritonclient.grpc as grpcclient

    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    result = client.infer("easyocr", [image], outputs=[grpcclient.InferRequestedOutput(n)
                                                       for n in ("BOXES", "TEXTS", "SCORES")])
    texts = [t.decode("utf-8") for t in result.as_numpy("TEXTS")[0]]
    return texts, result.as_numpy("BOXES")[0], result.as_numpy("SCORES")[0]


def run_served(url: str, pages: list[bytes], concurrency: int) -> tuple[float, list]:
    """Seconds to serve all pages with `concurrency` requests in flight (one client per thread), and results."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]
    serve_request(clients[0], pages[0])  # warm connection
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: serve_request(clients[i % concurrency], pages[i]), range(len(pages))))
    return time.perf_counter() - start, results


def run_readtext(weights: Path, device: str, pages: list[bytes]) -> tuple[float, list]:
    """readtext(path) on each page, the way EasyOCR users call it (the served model's parity reference)."""
    import tempfile

    from trident_serving.ocr import load_reader

    reader = load_reader(weights, device)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, page in enumerate(pages):
            paths.append(Path(folder) / f"page{i}.jpg")
            paths[-1].write_bytes(page)
        reader.readtext(str(paths[0]))  # warm-up, as the served model does at load
        start = time.perf_counter()
        results = [reader.readtext(str(path)) for path in paths]
        return time.perf_counter() - start, results


def same(readtext: list, served: list) -> bool:
    """Served (texts, boxes, scores) equal readtext's (box, text, score) lists within 1 px and 1e-3."""
    for expected, (texts, boxes, scores) in zip(readtext, served):
        if [t for _, t, _ in expected] != texts:
            return False
        for (box, _, score), got_box, got_score in zip(expected, boxes, scores):
            if np.abs(np.asarray(box, np.float32) - got_box).max() > 1 or abs(score - got_score) > 1e-3:
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--url", default=defaults.url, help="gRPC address of the server")
    parser.add_argument("--repository", type=Path, default=defaults.repository,
                        help="model repository the server uses (readtext loads easyocr/1/weights from it)")
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(defaults.concurrency))
    parser.add_argument("--device", default=defaults.device, help="device of the in-process Reader (auto: cuda if any)")
    parser.add_argument("--start", action="store_true",
                        help="start a server on --repository for the run (gRPC on the --url port, HTTP one below, "
                        "metrics one above: Triton's 8000/8001/8002 layout), then stop it")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    options = Options(args.url, args.repository, args.images, tuple(args.concurrency), args.device, args.start,
                      args.seed)

    import torch

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(options.seed)
    pages = [make_page(rng) for _ in range(options.images)]

    server_options = None
    if options.start:
        from trident_serving import server

        port = int(options.url.rsplit(":", 1)[1])
        server_options = server.ServerOptions(repository=options.repository, run_dir=ROOT / ".run" / "bench_ocr",
                                              http_port=port - 1, grpc_port=port, metrics_port=port + 1)
        server.start(server_options)
    try:
        rows = []
        seconds, reference = run_readtext(options.repository / "easyocr" / "1" / "weights", device, pages)
        rows.append((f"Reader.readtext, sequential ({device})", seconds, "reference"))
        for concurrency in options.concurrency:
            seconds, served = run_served(options.url, pages, concurrency)
            rows.append((f"served easyocr, concurrency {concurrency}", seconds,
                         "equal" if same(reference, served) else "DIFFERENT"))
    finally:
        if server_options is not None:
            server.stop(server_options)

    lines = sum(len(r) for r in reference)
    print(f"\n{options.images} pages of 1280x720, {lines / options.images:.1f} text lines read per page\n")
    print(f"{'mode':<42} {'seconds':>8} {'images/s':>9}  results vs readtext")
    for name, seconds, check in rows:
        print(f"{name:<42} {seconds:8.2f} {options.images / seconds:9.2f}  {check}")
    return 0 if all(check != "DIFFERENT" for _, _, check in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
