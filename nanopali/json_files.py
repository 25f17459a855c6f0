"""Reading the small JSON files of a checkpoint directory: model config, processor and tokenizer settings.

Every such file is optional (a missing one reads as {}), and a broken one (not UTF-8, not JSON, or JSON that is
not an object: null, a list, a number…) is an error that names the file, raised as the caller's own error class
so each loader keeps reporting its problems its way.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_json(file: Path, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `file` ({} when there is no such file); `error` when it is not valid JSON or not an object."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{file}: not a JSON text file (it is not UTF-8 text; is it a binary file?)") from None
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: {file.name} must hold a JSON object, found {json_kind(data)}")
    return data


def json_kind(value) -> str:
    """How a JSON value reads in a message: 'null', 'a list', 'a string', 'a number', 'true'…"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")
