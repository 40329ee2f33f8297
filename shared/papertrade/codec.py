"""The fast JSON codec for every NATS body: msgspec encoders and cached typed decoders."""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar, cast

import msgspec

from papertrade.errors import ValidationError

T = TypeVar("T")

_encoder = msgspec.json.Encoder(decimal_format="string")


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) as compact JSON bytes. Decimals become strings."""
    return _encoder.encode(obj)


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode JSON into `type_`; bad input raises ValidationError naming the offending field."""
    try:
        decoder: msgspec.json.Decoder[T] = _decoder(cast(Any, type_))
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ValidationError(_field_of(str(exc)), str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ValidationError("body", f"malformed JSON: {exc}") from None


def to_builtins(obj: Any) -> Any:
    """A Struct as JSON-ready builtins (dicts, lists, strings)."""
    return msgspec.to_builtins(obj, builtin_types=None)


def convert(obj: Any, type_: type[T]) -> T:
    """Build `type_` from builtins (e.g. a dict from a REST body), with the same errors as `decode`."""
    try:
        return msgspec.convert(obj, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationError(_field_of(str(exc)), str(exc)) from None


@cache
def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_, strict=False)


def _field_of(message: str) -> str:
    # msgspec messages end with " - at `$.field[0].sub`"
    marker = "at `$"
    i = message.rfind(marker)
    if i < 0:
        return "body"
    path = message[i + len(marker) :].rstrip("`")
    return path.lstrip(".") or "body"
