"""REST of CONTRACT.md's strategy-runner: deploy, list, status, stop, start, delete, samples.

Deploying, stopping, starting and deleting take the admin token (they run code and trade an account);
reading (list, status, samples) does not.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from papertrade.enums import Interval
from papertrade.errors import ValidationError
from papertrade.samples import samples
from papertrade.service import ApiError
from papertrade.service.app import AdminDep
from papertrade.strategy.loader import StrategyLoadError, build_strategy
from papertrade.symbols import normalize_symbol
from papertrade.timeutil import utcnow
from papertrade_strategy_runner.supervisor import BrokerUnavailable, Deployment, Supervisor, UnknownAccount

router = APIRouter(tags=["strategies"])


class DeployRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    entrypoint: str = Field(min_length=1, max_length=500, description="package.module:Class")
    params: dict[str, Any] = Field(default_factory=dict)
    symbols: list[str] = Field(min_length=1)
    interval: str = "1m"
    account_id: UUID


@router.post("/v1/strategies", status_code=201, dependencies=[AdminDep], summary="Deploy a strategy")
async def deploy(body: DeployRequest, request: Request) -> dict[str, str]:
    sup = _sup(request)
    try:
        symbols = list(dict.fromkeys(normalize_symbol(s, "symbols") for s in body.symbols))
        interval = Interval.parse(body.interval)
    except ValidationError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        # imports the user's module: off the event loop
        await asyncio.to_thread(build_strategy, body.entrypoint, body.params)
    except StrategyLoadError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        await sup.check_account(body.account_id)
    except UnknownAccount as exc:
        raise ApiError(422, str(exc)) from None
    except BrokerUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    now = utcnow()
    dep = Deployment(
        id=uuid.uuid4(),
        name=body.name,
        entrypoint=body.entrypoint.strip(),
        params=body.params,
        symbols=symbols,
        interval=interval.value,
        account_id=body.account_id,
        desired="running",
        status="running",
        created_at=now,
        updated_at=now,
    )
    await sup.create(dep)
    try:
        await sup.start(dep)
    except (UnknownAccount, BrokerUnavailable) as exc:
        await sup.delete(dep)
        raise ApiError(503 if isinstance(exc, BrokerUnavailable) else 422, str(exc)) from None
    return {"id": str(dep.id), "status": dep.status}


@router.get("/v1/strategies", summary="Every deployment and its status")
async def list_strategies(request: Request) -> list[dict[str, Any]]:
    return [d.view() for d in _sup(request).deployments.values()]


@router.get("/v1/strategies/{strategy_id}", summary="One deployment's status")
async def get_strategy(strategy_id: str, request: Request) -> dict[str, Any]:
    return _find(request, strategy_id).view()


@router.post("/v1/strategies/{strategy_id}/stop", dependencies=[AdminDep], summary="Stop a deployment")
async def stop_strategy(strategy_id: str, request: Request) -> dict[str, Any]:
    dep = _find(request, strategy_id)
    await _sup(request).stop(dep)
    return dep.view()


@router.post(
    "/v1/strategies/{strategy_id}/start", dependencies=[AdminDep], summary="Start a stopped deployment"
)
async def start_strategy(strategy_id: str, request: Request) -> dict[str, Any]:
    dep = _find(request, strategy_id)
    try:
        await _sup(request).start(dep)
    except UnknownAccount as exc:
        raise ApiError(422, str(exc)) from None
    except BrokerUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    return dep.view()


@router.delete(
    "/v1/strategies/{strategy_id}", status_code=204, dependencies=[AdminDep], summary="Stop and forget"
)
async def delete_strategy(strategy_id: str, request: Request) -> Response:
    dep = _find(request, strategy_id)
    await _sup(request).delete(dep)
    return Response(status_code=204)


@router.get("/v1/samples", summary="The shipped sample strategies")
async def list_samples() -> list[dict[str, str]]:
    return [{"name": s.name, "entrypoint": s.entrypoint, "description": s.description} for s in samples()]


def _sup(request: Request) -> Supervisor:
    sup = request.app.state.ctx.state.get("supervisor")
    if sup is None:
        raise ApiError(503, "the strategy-runner is starting: its database is not ready yet")
    return sup


def _find(request: Request, strategy_id: str) -> Deployment:
    try:
        key = UUID(strategy_id)
    except ValueError:
        raise ApiError(404, f"strategy {strategy_id} not found") from None
    dep = _sup(request).deployments.get(key)
    if dep is None:
        raise ApiError(404, f"strategy {strategy_id} not found")
    return dep
