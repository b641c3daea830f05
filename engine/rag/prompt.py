"""The answer prompt: the retrieved chunks numbered so the answer can cite them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.rag.types import Hit

SYSTEM = (
    "Answer the question using only the numbered sources below. Cite the sources you use "
    "as [1], [2] and so on. If the sources do not contain the answer, say you don't know."
)


def source_label(index: int, hit: Hit) -> str:
    where = [str(hit.metadata.get("file") or hit.document_id)]
    if hit.metadata.get("page"):
        where.append(f"p. {hit.metadata['page']}")
    return f"[{index}] ({', '.join(where)})"


def answer_messages(query: str, hits: Sequence[Hit]) -> list[dict[str, Any]]:
    if hits:
        sources = "\n\n".join(f"{source_label(i, h)}\n{h.text}" for i, h in enumerate(hits, 1))
    else:
        sources = "(no source matched the question)"
    return [
        {"role": "system", "content": f"{SYSTEM}\n\nSources:\n\n{sources}"},
        {"role": "user", "content": query},
    ]
