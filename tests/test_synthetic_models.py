"""The synthetic models load and run through the real loaders; the real MiniLM embeds correctly.

Random weights often pick EOS first, so generation tests bias EOS away to get exactly
`max_tokens` tokens. Nothing here may reach a model hub (HF_HUB_OFFLINE is set first).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before mlx-lm / mlx-vlm / huggingface_hub are imported

import mlx.core as mx
import model_fixtures
import numpy as np
import pytest

from engine.models import minilm, synthetic

# The session fixtures from tests/model_fixtures.py. tests/conftest.py may import them too:
# pytest then holds two definitions, and the second finds the models already built.
tiny_lm_dir = model_fixtures.tiny_lm_dir
tiny_vlm_dir = model_fixtures.tiny_vlm_dir
tiny_embedder_dir = model_fixtures.tiny_embedder_dir
minilm_dir = model_fixtures.minilm_dir

ROOT = Path(__file__).resolve().parent.parent
NO_EOS = -1e9

# all-MiniLM-L6-v2 through mlx-vlm's BERT (mean pooling, normalised); sentence-transformers
# on PyTorch gives cosine 0.7553 for this pair.
MINILM_FOOD = "A man is eating food."
MINILM_BREAD = "A man is eating a piece of bread."
MINILM_FOOD_HEAD = [0.03324165, 0.00440609, -0.00627693, 0.04837875, -0.13870230]
MINILM_BREAD_HEAD = [0.05251842, 0.05524132, -0.01118820, -0.00574538, -0.12720828]
MINILM_COSINE = 0.75533730


# --- helpers -------------------------------------------------------------------------------


def _file_digests(path: Path) -> dict[str, str]:
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


def _load_embedder(path: Path):
    """The way a backend loads a sentence model with mlx-vlm: model, tokenizer, max length."""
    from mlx_vlm.embedding_loader import load_embedding_model
    from mlx_vlm.models.pooling import read_pooling_config
    from transformers import AutoTokenizer

    model = load_embedding_model(path)  # a Path: the loader joins it with `/`
    # The loader does not read 1_Pooling itself (mlx-vlm's server sets this attribute).
    model.pooling_config = read_pooling_config(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    return model, tokenizer, max_len


def _embed(model, tokenizer, max_len: int, texts: list[str]) -> np.ndarray:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="np")
    out = model(mx.array(enc["input_ids"]), attention_mask=mx.array(enc["attention_mask"]))
    return np.array(out.text_embeds)


# --- lm ------------------------------------------------------------------------------------


def test_lm_loads_and_generates_through_mlx_lm(tiny_lm_dir: Path) -> None:
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = mlx_lm.load(str(tiny_lm_dir))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"

    bias = make_logits_processors(logit_bias=dict.fromkeys(tokenizer.eos_token_ids, NO_EOS))
    responses = list(
        mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=5, logits_processors=bias)
    )
    assert responses[-1].generation_tokens == 5
    assert responses[-1].finish_reason == "length"
    assert responses[-1].prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=3, logits_processors=bias)
    assert isinstance(text, str)


def test_lm_template_renders_tools_and_mlx_lm_detects_tool_calling(tiny_lm_dir: Path) -> None:
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(tiny_lm_dir))
    assert tokenizer.has_tool_calling
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt
    # The tool markers are single tokens, as in Qwen's vocabulary.
    assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) == 1


def test_lm_config_reports_its_shape(tiny_lm_dir: Path) -> None:
    config = json.loads((tiny_lm_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert config["max_position_embeddings"] == 2048
    assert synthetic.read_marker(tiny_lm_dir) == {
        "kind": "lm",
        "seed": 0,
        "params": {"hidden": 64, "layers": 2, "context_length": 2048, "head_dim": 64},
        "format": synthetic.FORMAT_VERSION,
    }


# --- vlm -----------------------------------------------------------------------------------


def test_vlm_loads_and_describes_an_image_through_mlx_vlm(
    tiny_vlm_dir: Path, tmp_path: Path
) -> None:
    import mlx_vlm
    from mlx_vlm.prompt_utils import apply_chat_template
    from PIL import Image

    image_path = tmp_path / "picture.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)

    model, processor = mlx_vlm.load(str(tiny_vlm_dir))
    prompt = apply_chat_template(processor, model.config, "Describe the picture.", num_images=1)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    result = mlx_vlm.generate(
        model,
        processor,
        prompt,
        image=[str(image_path)],
        max_tokens=4,
        verbose=False,
        logit_bias={eos: NO_EOS},
    )
    assert result.generation_tokens == 4
    text_only = len(processor.tokenizer.encode(prompt))
    assert result.prompt_tokens > text_only  # <|image_pad|> expanded to the image's patches


# --- embedder ------------------------------------------------------------------------------


def test_embedder_loads_through_mlx_vlm_and_returns_unit_vectors(tiny_embedder_dir: Path) -> None:
    model, tokenizer, max_len = _load_embedder(tiny_embedder_dir)
    assert model.pooling_config["pooling_mode_mean_tokens"] is True
    texts = ["A man is eating food.", "zebra", "Workflows run steps in order and in parallel."]
    batch = _embed(model, tokenizer, max_len, texts)
    assert batch.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    # Padding is masked: each row equals the text embedded alone.
    for row, text in zip(batch, texts, strict=True):
        np.testing.assert_allclose(row, _embed(model, tokenizer, max_len, [text])[0], atol=1e-5)


def test_embedder_limits_and_vocab_files(tiny_embedder_dir: Path) -> None:
    from transformers import BertTokenizer

    _, tokenizer, max_len = _load_embedder(tiny_embedder_dir)
    # As in all-MiniLM-L6-v2: the sentence-transformers limit is below the tokenizer's.
    assert (max_len, tokenizer.model_max_length) == (128, 512)
    long_text = " ".join(["food"] * 300)
    assert len(tokenizer(long_text).input_ids) == 302
    enc = tokenizer([long_text], truncation=True, max_length=max_len, return_tensors="np")
    assert enc["input_ids"].shape == (1, 128)
    # vocab.txt (written by hand) describes the same WordPiece as tokenizer.json.
    from_vocab = BertTokenizer(vocab=str(tiny_embedder_dir / "vocab.txt"))
    text = "A man is eating a zebra."
    assert from_vocab(text).input_ids == tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids
    modules = json.loads((tiny_embedder_dir / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]


# --- determinism and idempotence -----------------------------------------------------------


def test_builders_are_deterministic_across_processes(
    tiny_lm_dir: Path, tiny_vlm_dir: Path, tiny_embedder_dir: Path, tmp_path: Path
) -> None:
    # Another process: tokenizer training and hash-map order must not depend on the process.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from engine.models.synthetic import build_embedder, build_lm, build_vlm\n"
        "root = Path(sys.argv[1])\n"
        "build_lm(root / 'lm'); build_vlm(root / 'vlm'); build_embedder(root / 'embedder')\n"
        "build_embedder(root / 'seed1', seed=1)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=120)
    for name, built in [
        ("lm", tiny_lm_dir),
        ("vlm", tiny_vlm_dir),
        ("embedder", tiny_embedder_dir),
    ]:
        assert _file_digests(tmp_path / name) == _file_digests(built), name
    other_seed = _file_digests(tmp_path / "seed1")
    assert other_seed["model.safetensors"] != _file_digests(tiny_embedder_dir)["model.safetensors"]
    assert other_seed["tokenizer.json"] == _file_digests(tiny_embedder_dir)["tokenizer.json"]


def test_builders_are_idempotent(
    tiny_lm_dir: Path, tiny_vlm_dir: Path, tiny_embedder_dir: Path
) -> None:
    before = {
        p: (p / "model.safetensors").stat().st_mtime_ns
        for p in (tiny_lm_dir, tiny_vlm_dir, tiny_embedder_dir)
    }
    assert synthetic.build_lm(tiny_lm_dir) == tiny_lm_dir
    assert synthetic.build_vlm(tiny_vlm_dir) == tiny_vlm_dir
    assert synthetic.build_embedder(tiny_embedder_dir) == tiny_embedder_dir
    after = {p: (p / "model.safetensors").stat().st_mtime_ns for p in before}
    assert after == before


def test_builder_rebuilds_other_or_incomplete_models(tmp_path: Path) -> None:
    path = synthetic.build_embedder(tmp_path / "model", hidden=32)
    path = synthetic.build_embedder(path, hidden=48)  # another marker: rebuilt
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 48
    (path / "vocab.txt").unlink()  # incomplete: rebuilt
    synthetic.build_embedder(path, hidden=48)
    assert (path / "vocab.txt").is_file()
    assert not list(tmp_path.glob(".model.building*"))


def test_builder_refuses_a_directory_it_did_not_build(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        synthetic.build_lm(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="multiple of head_dim"):
        synthetic.build_lm(tmp_path / "odd", hidden=40)
    assert not (tmp_path / "odd").exists()


# --- the real MiniLM -----------------------------------------------------------------------


def test_minilm_embeds_like_sentence_transformers(minilm_dir: Path) -> None:
    model, tokenizer, max_len = _load_embedder(minilm_dir)
    assert max_len == 256
    texts = [
        MINILM_FOOD,
        MINILM_BREAD,
        "The girl is carrying a baby.",
        "A cheetah is running behind its prey.",
    ]
    vectors = _embed(model, tokenizer, max_len, texts)
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(vectors[0, :5], MINILM_FOOD_HEAD, atol=1e-4)
    np.testing.assert_allclose(vectors[1, :5], MINILM_BREAD_HEAD, atol=1e-4)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] == pytest.approx(MINILM_COSINE, abs=1e-4)
    assert similarity[0, 1] > max(
        similarity[0, 2], similarity[0, 3], similarity[1, 2], similarity[1, 3]
    )


def test_minilm_path_is_none_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    assert minilm.minilm_path() is None


def test_build_lm_heads_are_64_wide_by_default_and_can_be_narrower(tmp_path: Path) -> None:
    """Real models' heads are 64 wide, and MLX-CUDA 0.32.4 fails in batched decoding with
    16-wide ones (../shared/gpu/README.md): the default follows the real models."""

    def config(name: str, **params: int) -> dict[str, int]:
        built = synthetic.build_lm(tmp_path / name, **params)
        loaded: dict[str, int] = json.loads((built / "config.json").read_text())
        return loaded

    wide = config("wide", hidden=128)
    assert wide["hidden_size"] // wide["num_attention_heads"] == 64
    assert config("narrow", hidden=128, head_dim=16)["num_attention_heads"] == 8
    with pytest.raises(ValueError, match="multiple of head_dim"):
        synthetic.build_lm(tmp_path / "bad", hidden=96, head_dim=64)
