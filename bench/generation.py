"""Decode throughput through the server's /v1/chat/completions (streaming and not) versus
mlx_lm.stream_generate called directly on the same model, in the same run.

The model is a synthetic qwen2 (random weights, real architecture) large enough that a
token costs real compute; EOS is biased away so every request yields max_tokens tokens.

    .venv/bin/python bench/generation.py [--hidden 512 --layers 8 --tokens 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
from harness import Goal, Row, add_json_option, fusion_server, machine, median, write_rows

import engine.models  # noqa: F401  (chooses the BLAS before MLX loads)
from engine.models.blas import loaded as blas_loaded
from engine.models.synthetic import build_lm

MESSAGES = [{"role": "user", "content": "Tell me about unified memory."}]


def direct_rate(path: Path, tokens: int, repeats: int) -> float:
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tokenizer = mlx_lm.load(str(path))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    bias = make_logits_processors(logit_bias={tokenizer.eos_token_id: -1e9})
    rates = []
    for _ in range(repeats + 1):  # the first run compiles and warms caches
        start = time.perf_counter()
        count = 0
        for response in mlx_lm.stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=tokens,
            sampler=make_sampler(temp=0.0),
            logits_processors=bias,
        ):
            count = response.generation_tokens
        rates.append(count / (time.perf_counter() - start))
    return median(rates[1:])


def server_rates(path: Path, tokens: int, repeats: int, eos: int) -> tuple[float, float]:
    body = {
        "model": "bench",
        "messages": MESSAGES,
        "max_tokens": tokens,
        "temperature": 0.0,
        "logit_bias": {str(eos): -100},
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        fusion_server(
            Path(tmp), [{"model_path": str(path), "model_type": "lm", "model_id": "bench"}]
        ) as base,
        httpx.Client(base_url=base, timeout=600) as client,
    ):
        client.post("/v1/chat/completions", json=body).raise_for_status()
        plain, streamed = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            count = response.json()["usage"]["completion_tokens"]
            plain.append(count / (time.perf_counter() - start))

            start = time.perf_counter()
            count = 0
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            ) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            count = usage["completion_tokens"]
            streamed.append(count / (time.perf_counter() - start))
        return median(plain), median(streamed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    add_json_option(parser)
    args = parser.parse_args()
    print(f"machine: {machine()}; BLAS: {blas_loaded or 'MLX bundled reference BLAS'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_lm(Path(tmp) / "lm", hidden=args.hidden, layers=args.layers)
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(str(path)).eos_token_id
        direct = direct_rate(path, args.tokens, args.repeats)
        plain, streamed = server_rates(path, args.tokens, args.repeats, eos)
    print(
        f"model: synthetic qwen2 hidden {args.hidden}, {args.layers} layers; {args.tokens} tokens"
    )
    print(
        f"server non-streaming: {plain:.1f} tok/s vs mlx_lm direct {direct:.1f} tok/s "
        f"-> ratio {plain / direct:.3f} (goal >= 0.95)"
    )
    print(
        f"server streaming:     {streamed:.1f} tok/s vs mlx_lm direct {direct:.1f} tok/s "
        f"-> ratio {streamed / direct:.3f} (goal >= 0.95)"
    )
    write_rows(
        args.json,
        [
            Row(
                "generation",
                f"{name}, {args.tokens} tokens",
                rate,
                "tok/s",
                direct,
                "mlx_lm.stream_generate direct",
                Goal(">=", 0.95),
            )
            for name, rate in (
                ("/v1/chat/completions non-streaming", plain),
                ("/v1/chat/completions streaming", streamed),
            )
        ],
    )


if __name__ == "__main__":
    main()
