"""Model ids: what a load may name a model, and what any request may ask for.

An id is one or more segments joined by '/' (hub-style ids such as
`mlx-community/qwen` stay addressable), each segment made of ASCII letters, digits and
`. _ - : +`, and at most ``max_chars`` characters in all. A segment may not be `.` or
`..`, so an id never reads as a path step; and since control characters and whitespace
are outside the set, an id can neither write terminal escapes to a log nor hide in one.
"""

from __future__ import annotations

import re

from engine.errors import ErrorCode, InvalidRequest

MODEL_ID_CHARACTERS = "ASCII letters, digits and . _ - : +, in segments joined by '/'"
_SEGMENT = r"[A-Za-z0-9._:+-]+"
_SHAPE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")


def check_model_id(model_id: str, max_chars: int, param: str = "model_id") -> None:
    """InvalidRequest (``invalid_model_id``, naming ``param``) unless ``model_id`` is a
    well-formed id. The message quotes the id escaped (``ascii``), cut to 64 characters."""
    problem = None
    if len(model_id) > max_chars:
        problem = f"is {len(model_id)} characters long; the limit is {max_chars}"
    elif not _SHAPE.fullmatch(model_id):
        problem = f"must be made of {MODEL_ID_CHARACTERS}, with no empty segment"
    elif any(segment in (".", "..") for segment in model_id.split("/")):
        problem = "must not have a '.' or '..' segment"
    if problem is not None:
        raise InvalidRequest(
            f"{param} {model_id[:64]!a} {problem}", param=param, code=ErrorCode.INVALID_MODEL_ID
        )
