"""Risk's REST API (CONTRACT.md): limits, kill switch, the decision audit and an account's live state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.dialects.postgresql import insert

from papertrade.money import fmt
from papertrade.risk import Limits
from papertrade.service import ApiError
from papertrade.service.app import AdminDep
from papertrade_risk.service import RiskService
from papertrade_risk.tables import limits_table

router = APIRouter(prefix="/v1", tags=["risk"])


class KillSwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: UUID | None = Field(None, description="the account, or null for every account")
    engaged: bool
    reason: str = Field("", max_length=500)
    #: also cancel the open orders risk tracks for the account (or all accounts) when engaging
    cancel_orders: bool = False


@router.get("/limits/{account_id}", summary="An account's limits (null = unlimited)")
async def get_limits(account_id: UUID, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    limits = await svc.checker.load_limits(str(account_id))
    return limits.model_dump(mode="json")


@router.put("/limits/{account_id}", summary="Replace an account's limits (admin)", dependencies=[AdminDep])
async def put_limits(account_id: UUID, limits: Limits, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    now = datetime.now(UTC)
    doc = limits.model_dump(mode="json")
    async with svc.ctx.links.engine.begin() as conn:
        stmt = insert(limits_table).values(account_id=account_id, limits=doc, updated_at=now)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[limits_table.c.account_id], set_={"limits": doc, "updated_at": now}
            )
        )
    try:
        await svc.checker.set_limits(str(account_id), limits)
    except Exception as exc:
        raise ApiError(
            503, f"limits saved but not yet applied (Redis unreachable: {exc}); send them again", 50310000
        ) from None
    try:
        await svc.broadcast({"op": "limits", "a": str(account_id), "lim": limits.model_dump_json()})
    except Exception as exc:
        raise ApiError(
            503, f"limits saved but not confirmed by every risk replica ({exc}); send them again", 50310000
        ) from None
    return doc


@router.post("/kill-switch", summary="Engage or release a kill switch (admin)", dependencies=[AdminDep])
async def post_kill_switch(body: KillSwitchRequest, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    account = str(body.account_id) if body.account_id is not None else None
    try:
        await svc.set_kill_switch(account, body.engaged, body.reason)
    except Exception as exc:
        raise ApiError(503, f"kill switch not applied: {exc}", 50310000) from None
    canceled = 0
    if body.engaged and body.cancel_orders:
        canceled = await svc.cancel_open_orders(account)
    return {
        "account_id": account,
        "engaged": body.engaged,
        "reason": body.reason,
        "canceled_orders": canceled,
    }


@router.get("/kill-switch", summary="The kill switches")
async def get_kill_switch(request: Request) -> dict[str, Any]:
    return await _svc(request).kill_switches()


@router.get("/decisions", summary="Recent decisions, newest first")
async def get_decisions(
    request: Request,
    account_id: UUID | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[Any]:
    svc = _svc(request)
    try:
        return await svc.decisions(str(account_id) if account_id else None, limit)
    except Exception as exc:
        raise ApiError(503, f"decisions unavailable (Redis unreachable: {exc})", 50310000) from None


@router.get(
    "/exposure/{account_id}", summary="What risk holds for an account: positions, open orders, day P&L"
)
async def get_exposure(account_id: UUID, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    try:
        acct = await svc.checker.snapshot(str(account_id))
    except Exception as exc:
        raise ApiError(503, f"risk state unavailable (Redis unreachable: {exc})", 50310000) from None
    if acct is None:
        raise ApiError(503, "risk state unavailable", 50310000)
    state = acct.state
    return {  # the owner's memory when this replica owns the account, else Redis
        "account_id": str(account_id),
        "positions": {
            s: {"qty": fmt(p.qty), "avg_entry_price": fmt(p.avg)} for s, p in state.positions.items()
        },
        "open_orders": {
            oid: {"symbol": o.symbol, "side": o.side.value, "qty": fmt(o.qty), "price": fmt(o.price)}
            for oid, o in state.open_orders.items()
        },
        "day": state.day.isoformat() if state.day else None,
        "realized_pl": fmt(state.realised),
        "limits": acct.limits.model_dump(mode="json"),
    }


@router.get("/replica", summary="This replica's id and the accounts it owns (admin)", dependencies=[AdminDep])
async def get_replica(request: Request) -> dict[str, Any]:
    checker = _svc(request).checker
    return {
        "replica": checker.replica,
        "lease_seconds": checker.lease,
        "flush_seconds": checker.flush_interval,
        "redis": checker.health(),
        "accounts": checker.owned(),
    }


def _svc(request: Request) -> RiskService:
    svc: RiskService | None = request.app.state.ctx.state.get("risk")
    if svc is None:
        raise ApiError(503, "risk is starting", 50310000)
    return svc
