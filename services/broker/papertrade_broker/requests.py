"""Request bodies of the broker's REST API (documented in OpenAPI; semantics checked by the desk)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Number = str | int | float


class OrderRequest(BaseModel):
    """POST /v2/orders: Alpaca's order body (plus `all_or_none`). Decimals as strings or numbers."""

    model_config = ConfigDict(extra="ignore")

    symbol: str
    side: str
    type: str = "market"
    time_in_force: str = "day"
    qty: Number | None = None
    notional: Number | None = None
    limit_price: Number | None = None
    stop_price: Number | None = None
    client_order_id: str | None = None
    extended_hours: bool = False
    all_or_none: bool = False
    order_class: str | None = None


class ReplaceRequest(BaseModel):
    """PATCH /v2/orders/{id}: `qty` is the new total quantity."""

    model_config = ConfigDict(extra="ignore")

    qty: Number | None = None
    time_in_force: str | None = None
    limit_price: Number | None = None
    stop_price: Number | None = None
    client_order_id: str | None = None


class AccountRequest(BaseModel):
    """POST /admin/accounts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    cash: Number = "100000"
    shorting_enabled: bool = True
    commission: dict[str, Any] | None = None
    self_trade_prevention: str = "none"


class ClosePositionQuery(BaseModel):
    qty: Number | None = None
    percentage: Number | None = None
