"""Typed access to a JSON record's fields by dotted name, a wrong or missing one being a RecordError."""

from typing import Any, get_args, get_origin

from cromwell.data.sources.errors import RecordError

MISSING = object()


def require(record: dict[str, Any], name: str, kind: Any) -> Any:
    """record["a"]["b"] for name "a.b", which must be of `kind` (a type, or list[type])."""
    value = _lookup(record, name)
    if value is MISSING:
        raise RecordError(f"missing field '{name}'")
    return _checked(name, value, kind)


def optional(record: dict[str, Any], name: str, kind: Any) -> Any:
    """Like require, but a missing or null field is None."""
    value = _lookup(record, name)
    return None if value is MISSING or value is None else _checked(name, value, kind)


def _lookup(record: dict[str, Any], name: str) -> Any:
    value: Any = record
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def _checked(name: str, value: Any, kind: Any) -> Any:
    if not _is(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else str(kind)
        raise RecordError(f"field '{name}' must be {expected}, got {type(value).__name__} {_short(value)}")
    return value


def _is(value: Any, kind: Any) -> bool:
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        return isinstance(value, list) and all(_is(v, item) for v in value)
    # JSON true/false are Python bools, which are ints too: a flag is no count.
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
