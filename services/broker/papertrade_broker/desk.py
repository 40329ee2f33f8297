"""The order desk: accounts, authentication, submit / cancel / replace, and the read side.

Writes go to Postgres (the broker is the only writer); commands go to the books on `ex.cmd.<symbol>`
through JetStream with a message id per command, so a retried publish is deduplicated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

import msgspec
import psycopg
import structlog
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Select, Text, cast, func, insert, or_, select, text, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from papertrade import codec
from papertrade.bus import subjects
from papertrade.bus.streams import ack_refusal
from papertrade.enums import OrderStatus, OrderType, SelfTradePrevention, Side, TimeInForce
from papertrade.errors import ValidationError
from papertrade.instruments import instrument
from papertrade.ledger import CommissionModel, PositionState, buying_power, market_values, reservation
from papertrade.messages import (
    CancelCmd,
    NewOrderCmd,
    ReplaceCmd,
    RiskCheckRequest,
    RiskDecision,
    TradeUpdate,
)
from papertrade.money import ZERO, check_tick, fmt, to_decimal
from papertrade.service import ApiError, ServiceContext
from papertrade.symbols import normalize_symbol
from papertrade.timeutil import utcnow
from papertrade_broker import auth, hotpath, recovery
from papertrade_broker.market import Market
from papertrade_broker.requests import AccountRequest, OrderRequest, ReplaceRequest
from papertrade_broker.tables import OPEN_STATUSES, accounts, api_keys, order_holds, orders, positions
from papertrade_broker.views import order_view

_E = TypeVar("_E", Side, OrderType, TimeInForce)
_log = structlog.get_logger("papertrade_broker.desk")

#: Market orders hold buying power at the latest price times this (the fill may walk the book).
MARKET_BUFFER = Decimal("1.0")
#: Seconds to wait for JetStream's ack of a new order's command before the order is rejected.
PUBLISH_ACK_TIMEOUT = 5.0
#: Key pairs checked against their scrypt hash (once per pair and process; the rest are cache hits).
KEY_CHECKS = Counter("papertrade_broker_key_checks_total", "API key pairs checked by scrypt")


@dataclass(frozen=True)
class AccountInfo:
    id: UUID
    shorting_enabled: bool
    commission: CommissionModel
    stp: SelfTradePrevention


@dataclass(frozen=True)
class OrderSpec:
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    qty: Decimal | None
    notional: Decimal | None
    limit_price: Decimal | None
    stop_price: Decimal | None
    all_or_none: bool
    extended_hours: bool


class Desk:
    def __init__(
        self,
        ctx: ServiceContext,
        market: Market,
        risk_timeout: float,
        engine: AsyncEngine,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]],
        risk_batch: int = 64,
    ) -> None:
        self.ctx = ctx
        #: Raw psycopg connections for the submit hot path (`hotpath`).
        self.pool = pool
        #: The broker's own pool: sized for many concurrent clients, no pre-ping round trip per checkout
        #: (a dropped connection is invalidated by SQLAlchemy on its first error).
        self.engine = engine
        self.market = market
        self.risk_timeout = risk_timeout
        #: The most orders in one risk.check request (1: the single-object form only).
        self.risk_batch = risk_batch
        self._verified: dict[bytes, UUID] = {}
        #: Key pairs being checked by scrypt now: concurrent requests with one pair share one check.
        self._verifying: dict[bytes, asyncio.Future[UUID]] = {}
        #: New orders' commands awaiting JetStream's ack, by the number ending their reply subject.
        self._unacked: dict[int, _Unacked] = {}
        self._ack_prefix: str | None = None
        self._ack_count = 0
        self._ack_init = asyncio.Lock()
        self._accounts: dict[UUID, AccountInfo] = {}
        #: When this desk started: orders pending from before are a stopped broker's (`recover_pending`).
        self.started = utcnow()
        #: True once `recover_pending` went through.
        self.recovered = False
        #: Books new orders, many per transaction (`start` / `stop` with the service).
        self.writer = hotpath.GroupCommit(
            pool,
            screen=self._screen,
            check=self._check_new,
            prices=market.prices,
            release=self._release_new,
            route=self._route_booked,
            prepare=self._prepare_booked,
        )

    def start(self) -> None:
        self.writer.start()

    async def stop(self) -> None:
        await self.writer.stop()

    # --- accounts and keys ----------------------------------------------------------------------

    async def create_account(self, req: AccountRequest) -> dict[str, Any]:
        if "\x00" in req.name:
            raise ValidationError("name", "must not contain NUL characters")
        cash = to_decimal(req.cash, "cash", non_negative=True)
        commission = CommissionModel.parse(req.commission)
        try:
            stp = SelfTradePrevention(req.self_trade_prevention)
        except ValueError:
            allowed = ", ".join(s.value for s in SelfTradePrevention)
            raise ValidationError("self_trade_prevention", f"must be one of {allowed}") from None
        account_id = uuid.uuid4()
        now = utcnow()
        number = "PA" + uuid.uuid4().hex[:10].upper()
        key_id, secret = auth.new_key_pair()
        salt, digest = await asyncio.to_thread(auth.hash_secret, secret)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(accounts).values(
                    id=account_id,
                    name=req.name,
                    account_number=number,
                    cash=cash,
                    starting_cash=cash,
                    shorting_enabled=req.shorting_enabled,
                    commission=commission.to_dict() if commission.kind != "none" else None,
                    self_trade_prevention=stp.value,
                    created_at=now,
                )
            )
            await conn.execute(
                insert(api_keys).values(
                    key_id=key_id, account_id=account_id, salt=salt, secret_hash=digest, created_at=now
                )
            )
        return {
            "id": str(account_id),
            "name": req.name,
            "account_number": number,
            "api_key_id": key_id,
            "api_secret_key": secret,
            "cash": fmt(cash),
            "shorting_enabled": req.shorting_enabled,
            "commission": commission.to_dict(),
            "self_trade_prevention": stp.value,
        }

    async def new_key(self, account_id: UUID) -> dict[str, Any]:
        key_id, secret = auth.new_key_pair()
        salt, digest = await asyncio.to_thread(auth.hash_secret, secret)
        async with self.engine.begin() as conn:
            found = (await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))).first()
            if found is None:
                raise ApiError.not_found(f"account {account_id} not found")
            await conn.execute(
                insert(api_keys).values(
                    key_id=key_id, account_id=account_id, salt=salt, secret_hash=digest, created_at=utcnow()
                )
            )
        return {"account_id": str(account_id), "api_key_id": key_id, "api_secret_key": secret}

    async def list_accounts(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(accounts).order_by(accounts.c.created_at))).mappings().all()
        return [_admin_account(r) for r in rows]

    async def get_account_admin(self, account_id: UUID) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).mappings().first()
        if row is None:
            raise ApiError.not_found(f"account {account_id} not found")
        return _admin_account(row)

    async def authenticate(self, key_id: str | None, secret: str | None) -> AccountInfo:
        """The account of a key pair (scrypt once per pair and process, then a digest lookup)."""
        if not key_id or not secret:
            raise ApiError.unauthorized("missing APCA-API-KEY-ID / APCA-API-SECRET-KEY headers")
        if "\x00" in key_id or len(key_id) > 64:
            raise ApiError.unauthorized("request is not authorized: unknown key id or wrong secret")
        fp = auth.fingerprint(key_id, secret)
        account_id = self._verified.get(fp)
        if account_id is None:
            check = self._verifying.get(fp)
            if check is None:
                check = self._verifying[fp] = asyncio.ensure_future(self._verify(key_id, secret))
                check.add_done_callback(functools.partial(self._verify_done, fp))
            account_id = await asyncio.shield(check)
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[fp] = account_id
        return await self.account_info(account_id)

    async def account_info(self, account_id: UUID) -> AccountInfo:
        info = self._accounts.get(account_id)
        if info is None:
            async with self.engine.connect() as conn:
                row = (
                    (await conn.execute(select(accounts).where(accounts.c.id == account_id)))
                    .mappings()
                    .first()
                )
            if row is None:
                raise ApiError.unauthorized("request is not authorized: the key's account no longer exists")
            info = AccountInfo(
                id=account_id,
                shorting_enabled=bool(row["shorting_enabled"]),
                commission=CommissionModel.parse(row["commission"]),
                stp=SelfTradePrevention(row["self_trade_prevention"]),
            )
            self._accounts[account_id] = info
        return info

    async def _verify(self, key_id: str, secret: str) -> UUID:
        """The account of a key pair, by its salted scrypt hash (in a thread: ~50 ms of CPU)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.account_id, api_keys.c.salt, api_keys.c.secret_hash).where(
                        api_keys.c.key_id == key_id[:64]
                    )
                )
            ).first()
        if row is not None:
            KEY_CHECKS.inc()
        if row is None or not await asyncio.to_thread(auth.verify_secret, secret, row.salt, row.secret_hash):
            raise ApiError.unauthorized("request is not authorized: unknown key id or wrong secret")
        account_id: UUID = row.account_id
        return account_id

    def _verify_done(self, fp: bytes, check: asyncio.Future[UUID]) -> None:
        self._verifying.pop(fp, None)
        if not check.cancelled():
            check.exception()  # retrieved: every waiter may have gone

    # --- orders: write side ---------------------------------------------------------------------

    async def submit(self, acct: AccountInfo, req: OrderRequest) -> dict[str, Any]:
        """Validate, then book (`hotpath.GroupCommit`: risk, buying power, Postgres, the book's command);
        the same client_order_id returns the first order."""
        coid = _client_order_id(req.client_order_id)
        if coid is not None:
            existing = await self._by_coid(acct.id, coid)
            if existing is not None:
                return order_view(existing)
        spec = await self._validate(req)
        ref_price = await self._reference_price(spec)
        order_id = uuid.uuid4()
        now = utcnow()
        values = {
            "id": order_id,
            "account_id": acct.id,
            "client_order_id": coid or str(order_id),
            "symbol": spec.symbol,
            "side": spec.side.value,
            "type": spec.type.value,
            "time_in_force": spec.time_in_force.value,
            "qty": spec.qty,
            "notional": spec.notional,
            "limit_price": spec.limit_price,
            "stop_price": spec.stop_price,
            "all_or_none": spec.all_or_none,
            "extended_hours": spec.extended_hours,
            "status": OrderStatus.PENDING_NEW.value,
            "reserve_price": ref_price,
            "reserved": ZERO,
            "created_at": now,
            "updated_at": now,
            "submitted_at": now,
        }
        # `now` (wall clock) stamps the order's row; `t` (`Market.exchange_time`) its risk check and its
        # command, and so its executions and its DAY expiry at the book, which runs on the streamer's clock.
        item = hotpath.NewOrder(acct, spec, values, await self.market.exchange_time())
        try:
            row = await self.writer.submit(item)
        except hotpath.NoAccount:
            raise ApiError.unauthorized("request is not authorized: the account no longer exists") from None
        except psycopg.DataError as exc:
            raise ApiError.unprocessable(f"invalid value: {str(exc).splitlines()[0]}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise ApiError(503, f"database unavailable: {type(exc).__name__}") from None
        if row is None:  # a concurrent request with the same client_order_id won
            assert coid is not None
            existing = await self._by_coid(acct.id, coid)
            assert existing is not None
            return order_view(existing)
        return item.view if item.view is not None else order_view(row)

    async def cancel(self, acct: AccountInfo, order_id: UUID) -> None:
        """Mark the order pending_cancel and send its cancel. An order already pending_cancel gets its
        cancel sent again (the first may not have reached the stream: a 503, a broker stopped in
        between); a book that no longer holds the order refuses the repeat, which changes nothing for an
        order already done, and JetStream drops a repeat within its duplicate window."""
        async with self.engine.begin() as conn:
            row = await self._order_for_update(conn, acct.id, order_id)
            status = OrderStatus(row["status"])
            if not status.is_open:
                raise ApiError.unprocessable(f"order {order_id} is not cancelable (status {status.value})")
            if status is OrderStatus.PENDING_NEW and not self.recovered and row["created_at"] < self.started:
                # its command may never have reached the book: a cancel now would be refused there and
                # leave the order open here; start-up recovery settles it first
                raise ApiError(
                    503,
                    f"order {order_id} is being recovered after a broker restart; try again in a few seconds",
                )
            if status is not OrderStatus.PENDING_CANCEL:
                await conn.execute(
                    update(orders)
                    .where(orders.c.id == order_id)
                    .values(status=OrderStatus.PENDING_CANCEL.value, updated_at=utcnow())
                )
        cmd = CancelCmd(
            order_id=order_id, account_id=acct.id, symbol=row["symbol"], t=await self.market.exchange_time()
        )
        await self._publish(row["symbol"], codec.encode(cmd), f"{order_id}:cancel")

    async def cancel_all(self, acct: AccountInfo) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(orders)
                        .where(orders.c.account_id == acct.id, orders.c.status.in_(OPEN_STATUSES))
                        .order_by(orders.c.seq)
                    )
                )
                .mappings()
                .all()
            )
        results: list[dict[str, Any]] = []
        for row in rows:
            try:
                await self.cancel(acct, row["id"])
                fresh = await self.get_order(acct, row["id"])
                results.append({"id": str(row["id"]), "status": 200, "body": fresh})
            except ApiError as err:
                results.append(
                    {
                        "id": str(row["id"]),
                        "status": err.status,
                        "body": {"code": err.code, "message": err.message},
                    }
                )
        return results

    async def replace(self, acct: AccountInfo, order_id: UUID, req: ReplaceRequest) -> dict[str, Any]:
        """A new order that replaces `order_id` once the book confirms (Alpaca's PATCH)."""
        async with self.engine.connect() as conn:
            old = (
                (
                    await conn.execute(
                        select(orders).where(orders.c.id == order_id, orders.c.account_id == acct.id)
                    )
                )
                .mappings()
                .first()
            )
        if old is None:
            raise ApiError.not_found(f"order {order_id} not found")
        coid = _client_order_id(req.client_order_id)
        if coid is not None:
            existing = await self._by_coid(acct.id, coid)
            if existing is not None:
                if existing["replaces"] == order_id:
                    return order_view(existing)
                raise ApiError.unprocessable(f"client_order_id {coid!r} is already used by another order")
        spec = self._replace_spec(old, req)
        ref_price = await self._reference_price(spec)
        new_id = uuid.uuid4()
        now = utcnow()
        t = await self.market.exchange_time()
        spec = await self._ask_risk(acct, spec, new_id, t, replaces=order_id)
        row = await self._persist_replace(acct, old, spec, new_id, coid or str(new_id), ref_price, now)
        cmd = ReplaceCmd(
            order_id=order_id,
            new_order_id=new_id,
            account_id=acct.id,
            symbol=spec.symbol,
            t=t,
            qty=spec.qty,
            limit_price=spec.limit_price,
            stop_price=spec.stop_price,
            time_in_force=spec.time_in_force,
        )
        await self._route(spec.symbol, codec.encode(cmd), f"{order_id}:replace:{new_id}", new_id)
        return order_view(row)

    async def recover_pending(self) -> recovery.Outcome:
        """The orders a stopped broker left between commit and command, before this desk started
        (`papertrade_broker.recovery`): rejected if their command never reached EX_CMD, cancels sent
        again. Until it went through, such an order cannot be canceled (503)."""
        outcome = await recovery.recover(
            self.engine,
            self.ctx.links.js,
            self.started,
            self._release_risk,
            self._announce_rejected,
            self.market.exchange_time,
        )
        self.recovered = True
        return outcome

    # --- orders: read side ----------------------------------------------------------------------

    async def get_order(self, acct: AccountInfo, order_id: UUID) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(orders).where(orders.c.id == order_id, orders.c.account_id == acct.id)
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise ApiError.not_found(f"order {order_id} not found")
        return order_view(row)

    async def get_by_coid(self, acct: AccountInfo, coid: str) -> dict[str, Any]:
        row = await self._by_coid(acct.id, coid) if "\x00" not in coid else None
        if row is None:
            raise ApiError.not_found(f"order with client_order_id {coid!r} not found")
        return order_view(row)

    async def list_orders(
        self,
        acct: AccountInfo,
        *,
        status: str,
        limit: int,
        after: datetime | None,
        until: datetime | None,
        direction: str,
        symbols: Sequence[str],
        side: Side | None,
    ) -> list[dict[str, Any]]:
        q = select(orders).where(orders.c.account_id == acct.id)
        if status == "open":
            q = q.where(orders.c.status.in_(OPEN_STATUSES))
        elif status == "closed":
            q = q.where(orders.c.status.notin_(OPEN_STATUSES))
        if after is not None:
            q = q.where(orders.c.submitted_at > after)
        if until is not None:
            q = q.where(orders.c.submitted_at < until)
        if symbols:
            q = q.where(orders.c.symbol.in_(list(symbols)))
        if side is not None:
            q = q.where(orders.c.side == side.value)
        q = q.order_by(orders.c.seq.asc() if direction == "asc" else orders.c.seq.desc()).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [order_view(r) for r in rows]

    async def open_positions(self, account_id: UUID) -> dict[str, PositionState]:
        async with self.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(positions)
                        .where(positions.c.account_id == account_id, positions.c.qty != 0)
                        .order_by(positions.c.symbol)
                    )
                )
                .mappings()
                .all()
            )
        return {r["symbol"]: PositionState(r["qty"], r["cost"], r["realized_pl"]) for r in rows}

    async def account_state(self, account_id: UUID) -> tuple[RowMapping, dict[str, PositionState], Decimal]:
        """(account row, open positions, buying power reserved by open orders)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).mappings().one()
            reserved = (await conn.execute(_reserved_by(account_id))).scalar_one()
        return row, await self.open_positions(account_id), Decimal(reserved)

    # --- helpers --------------------------------------------------------------------------------

    async def _validate(self, req: OrderRequest) -> OrderSpec:
        symbol = normalize_symbol(req.symbol)
        if symbol not in await self.market.symbols():
            raise ApiError.unprocessable(f"asset {symbol} is not tradable here (not in the watchlist)")
        side = _enum(Side, req.side, "side")
        otype = _enum(OrderType, req.type, "type")
        tif = _enum(TimeInForce, req.time_in_force, "time_in_force")
        if req.order_class not in (None, "", "simple"):
            raise ValidationError("order_class", f"only simple orders are supported, got {req.order_class!r}")
        inst = instrument(symbol)
        qty = notional = None
        if (req.qty is None) == (req.notional is None):
            raise ValidationError("qty", "give exactly one of qty or notional")
        if req.qty is not None:
            qty = to_decimal(req.qty, "qty", positive=True)
            if qty % inst.lot:
                raise ValidationError("qty", f"{fmt(qty)} is not a multiple of the lot size {fmt(inst.lot)}")
        else:
            notional = to_decimal(req.notional, "notional", positive=True)
            if notional.as_tuple().exponent < -2:  # type: ignore[operator]
                raise ValidationError("notional", "must be in whole cents")
            if otype is not OrderType.MARKET:
                raise ValidationError("notional", "notional orders must be market orders")
            if req.all_or_none:
                raise ValidationError("all_or_none", "notional orders cannot be all_or_none")
        limit_price = _price(req.limit_price, "limit_price", otype.needs_limit_price, inst.tick)
        stop_price = _price(req.stop_price, "stop_price", otype.needs_stop_price, inst.tick)
        if otype in (OrderType.STOP, OrderType.STOP_LIMIT) and not tif.rests:
            raise ValidationError("time_in_force", f"{otype.value} orders take day or gtc, not {tif.value}")
        if req.extended_hours and (otype is not OrderType.LIMIT or tif is not TimeInForce.DAY):
            raise ValidationError("extended_hours", "extended hours orders must be limit orders with day")
        return OrderSpec(
            symbol,
            side,
            otype,
            tif,
            qty,
            notional,
            limit_price,
            stop_price,
            req.all_or_none,
            req.extended_hours,
        )

    def _replace_spec(self, old: RowMapping, req: ReplaceRequest) -> OrderSpec:
        status = OrderStatus(old["status"])
        if not status.is_open or status is OrderStatus.PENDING_CANCEL:
            raise ApiError.unprocessable(f"order {old['id']} cannot be replaced (status {status.value})")
        if old["replaced_by"] is not None:
            raise ApiError.unprocessable(f"order {old['id']} is already being replaced")
        if old["notional"] is not None:
            raise ApiError.unprocessable("notional orders cannot be replaced")
        if all(v is None for v in (req.qty, req.time_in_force, req.limit_price, req.stop_price)):
            raise ValidationError("body", "give at least one of qty, time_in_force, limit_price, stop_price")
        otype = OrderType(old["type"])
        inst = instrument(old["symbol"])
        qty = old["qty"] if req.qty is None else to_decimal(req.qty, "qty", positive=True)
        if qty % inst.lot:
            raise ValidationError("qty", f"{fmt(qty)} is not a multiple of the lot size {fmt(inst.lot)}")
        if qty <= old["filled_qty"]:
            raise ApiError.unprocessable(
                f"qty {fmt(qty)} must be above the filled quantity {fmt(old['filled_qty'])}"
            )
        tif = TimeInForce(old["time_in_force"])
        if req.time_in_force is not None:
            tif = _enum(TimeInForce, req.time_in_force, "time_in_force")
        if req.limit_price is not None and not otype.needs_limit_price:
            raise ValidationError("limit_price", f"a {otype.value} order has no limit price")
        if req.stop_price is not None and not otype.needs_stop_price:
            raise ValidationError("stop_price", f"a {otype.value} order has no stop price")
        limit_price = old["limit_price"]
        if req.limit_price is not None:
            limit_price = _price(req.limit_price, "limit_price", True, inst.tick)
        stop_price = old["stop_price"]
        if req.stop_price is not None:
            stop_price = _price(req.stop_price, "stop_price", True, inst.tick)
        if otype in (OrderType.STOP, OrderType.STOP_LIMIT) and not tif.rests:
            raise ValidationError("time_in_force", f"{otype.value} orders take day or gtc, not {tif.value}")
        return OrderSpec(
            old["symbol"],
            Side(old["side"]),
            otype,
            tif,
            qty,
            None,
            limit_price,
            stop_price,
            bool(old["all_or_none"]),
            bool(old["extended_hours"]),
        )

    async def _reference_price(self, spec: OrderSpec) -> Decimal:
        """The price an order's buying power is held at: its limit, else stop, else the latest price."""
        if spec.limit_price is not None:
            return spec.limit_price
        if spec.stop_price is not None:
            return spec.stop_price
        price = await self.market.price(spec.symbol)
        return price * MARKET_BUFFER if price is not None else ZERO

    def _risk_request(
        self, acct: AccountInfo, spec: OrderSpec, order_id: UUID, t: datetime, replaces: UUID | None = None
    ) -> RiskCheckRequest:
        """The risk check of an order at `t` (`Market.exchange_time`: the simulation time, else the wall clock)."""
        return RiskCheckRequest(
            order_id=order_id,
            account_id=acct.id,
            symbol=spec.symbol,
            side=spec.side,
            type=spec.type,
            time_in_force=spec.time_in_force,
            t=t,
            qty=spec.qty,
            notional=spec.notional,
            limit_price=spec.limit_price,
            stop_price=spec.stop_price,
            replaces=replaces,
        )

    async def _ask_risk(
        self,
        acct: AccountInfo,
        spec: OrderSpec,
        order_id: UUID,
        t: datetime,
        replaces: UUID | None = None,
    ) -> OrderSpec:
        """Risk's decision on one order: the spec to book (clipped or not), or the ApiError refusing it."""
        req = self._risk_request(acct, spec, order_id, t, replaces)
        return _decided(spec, (await self._risk_decisions([req]))[0])

    async def _screen(
        self, batch: Sequence[hotpath.NewOrder[AccountInfo, OrderSpec]]
    ) -> list[BaseException | None]:
        """The group commit's risk step: one risk.check request per `risk_batch` orders (sent together);
        per order None (approved; a clip is applied to the order) or the error that refuses it."""
        reqs = [self._risk_request(b.account, b.spec, b.values["id"], b.t) for b in batch]
        size = max(self.risk_batch, 1)
        chunks = [reqs[i : i + size] for i in range(0, len(reqs), size)]
        answers = await asyncio.gather(*(self._risk_decisions(c) for c in chunks), return_exceptions=True)
        out: list[BaseException | None] = []
        for chunk, answer in zip(chunks, answers, strict=True):
            decisions = answer if isinstance(answer, list) else [answer] * len(chunk)
            for decision in decisions:
                item = batch[len(out)]
                if isinstance(decision, BaseException):
                    out.append(decision)
                    continue
                try:
                    _apply_spec(item, _decided(item.spec, decision))
                except ApiError as exc:
                    out.append(exc)
                    continue
                out.append(None)
        return out

    async def _risk_decisions(self, reqs: Sequence[RiskCheckRequest]) -> list[RiskDecision]:
        """Risk's decisions on `reqs`, in order: one request (the single form for one order, the array
        form for several); raises the ApiError that refuses them all when risk does not answer."""
        payload = codec.encode(reqs[0] if len(reqs) == 1 else list(reqs))
        try:
            msg = await self.ctx.links.nats.request(subjects.RISK_CHECK, payload, timeout=self.risk_timeout)
            if len(reqs) == 1:
                return [codec.decode(msg.data, RiskDecision)]
            decisions = codec.decode(msg.data, list[RiskDecision])
            if len(decisions) != len(reqs):
                raise ValidationError("body", f"{len(decisions)} decisions for {len(reqs)} orders")
            return decisions
        except NoRespondersError:
            raise ApiError.forbidden(
                "risk: unavailable (no risk service answers risk.check); order refused"
            ) from None
        except (NatsTimeoutError, TimeoutError):
            # Risk may still approve (and reserve) after we gave up: hand the exposure back.
            for req in reqs:
                await self._release_risk(req.account_id, req.symbol, req.order_id, "risk.check timed out")
            raise ApiError.forbidden(
                f"risk: unavailable (no answer within {self.risk_timeout:g}s); order refused"
            ) from None
        except ValidationError as exc:
            raise ApiError.forbidden(f"risk: unreadable decision ({exc}); order refused") from None
        except Exception as exc:  # link down
            raise ApiError.forbidden(f"risk: unavailable ({type(exc).__name__}); order refused") from None

    def _release_new(self, item: hotpath.NewOrder[AccountInfo, OrderSpec], reason: str) -> None:
        """The group commit refused an order risk approved (buying power, a taken client_order_id, a
        lost database): risk gets its reservation back."""
        self.ctx.spawn(
            self._release_risk(item.account_id, item.symbol, item.values["id"], reason), "risk-release"
        )

    async def _route_booked(
        self, item: hotpath.NewOrder[AccountInfo, OrderSpec], row: Mapping[str, Any]
    ) -> None:
        """The group commit's last step: a booked order's command to its book."""
        payload = item.command if item.command is not None else codec.encode(_new_order_cmd(item))
        await self._route_new(item.account.id, item.spec.symbol, payload, item.values["id"])

    def _prepare_booked(self, item: hotpath.NewOrder[AccountInfo, OrderSpec], row: Mapping[str, Any]) -> None:
        """The group commit's `prepare`: the answer and the book's command of an order being committed."""
        item.view = order_view(row)
        item.command = codec.encode(_new_order_cmd(item))

    async def _check_new(
        self,
        acct: AccountInfo,
        spec: OrderSpec,
        ref_price: Decimal,
        cash: Decimal,
        reserved_sum: Decimal,
        same_side_sum: Decimal,
        held: list[list[str]],
        prices: Mapping[str, Decimal],
    ) -> Decimal:
        """The group commit's check of one new order against its locked account (`prices`: of the
        batch's shorts, read once per batch)."""
        return await self._needed_buying_power(
            acct, spec, ref_price, ZERO, cash, reserved_sum, same_side_sum, held, prices
        )

    async def _persist_replace(
        self,
        acct: AccountInfo,
        old: RowMapping,
        spec: OrderSpec,
        new_id: UUID,
        coid: str,
        ref_price: Decimal,
        now: datetime,
    ) -> RowMapping:
        try:
            async with self.engine.begin() as conn:
                locked = await self._order_for_update(conn, acct.id, old["id"])
                self._replace_spec(locked, ReplaceRequest(qty=str(spec.qty)))  # still replaceable?
                remaining = OrderSpec(
                    spec.symbol,
                    spec.side,
                    spec.type,
                    spec.time_in_force,
                    (spec.qty or ZERO) - locked["filled_qty"],
                    None,
                    spec.limit_price,
                    spec.stop_price,
                    spec.all_or_none,
                    spec.extended_hours,
                )
                reserved = await self._check_buying_power(conn, acct, remaining, ref_price, replaced=locked)
                row = (
                    (
                        await conn.execute(
                            insert(orders)
                            .values(
                                id=new_id,
                                account_id=acct.id,
                                client_order_id=coid,
                                symbol=spec.symbol,
                                side=spec.side.value,
                                type=spec.type.value,
                                time_in_force=spec.time_in_force.value,
                                qty=spec.qty,
                                limit_price=spec.limit_price,
                                stop_price=spec.stop_price,
                                all_or_none=spec.all_or_none,
                                extended_hours=spec.extended_hours,
                                status=OrderStatus.PENDING_NEW.value,
                                filled_qty=locked["filled_qty"],
                                filled_notional=locked["filled_notional"],
                                fees=locked["fees"],
                                reserve_price=ref_price,
                                reserved=reserved,
                                replaces=old["id"],
                                created_at=now,
                                updated_at=now,
                                submitted_at=now,
                            )
                            .returning(*orders.c)
                        )
                    )
                    .mappings()
                    .one()
                )
                await conn.execute(
                    update(orders).where(orders.c.id == old["id"]).values(replaced_by=new_id, updated_at=now)
                )
            return row
        except IntegrityError:
            raise ApiError.unprocessable(
                f"client_order_id {coid!r} is already used by another order"
            ) from None

    async def _check_buying_power(
        self,
        conn: AsyncConnection,
        acct: AccountInfo,
        spec: OrderSpec,
        ref_price: Decimal,
        *,
        replaced: RowMapping,
    ) -> Decimal:
        """Lock the account, check that the replacement `spec` fits once `replaced` (an open order of
        the same symbol and side, locked) holds nothing; returns the buying power it reserves."""
        reserved_q = _reserved_by(acct.id).scalar_subquery()
        same_q = (
            select(func.coalesce(func.sum(order_holds.c.open_qty), 0))
            .where(
                order_holds.c.account_id == acct.id,
                order_holds.c.symbol == spec.symbol,
                order_holds.c.side == spec.side.value,
            )
            .scalar_subquery()
        )
        held_q = (
            select(func.json_agg(func.json_build_array(positions.c.symbol, cast(positions.c.qty, Text))))
            .where(
                positions.c.account_id == acct.id,
                or_(positions.c.symbol == spec.symbol, positions.c.qty < 0),
            )
            .scalar_subquery()
        )
        # Serialized with the account's submits (the group commit's advisory lock), then one round trip:
        # lock the account row, read what open orders hold and the positions that matter.
        await conn.execute(
            text(f"SELECT pg_advisory_xact_lock({hotpath.LOCK_NAMESPACE}, :k)"),
            {"k": hotpath.account_lock_key(acct.id)},
        )
        row = (
            await conn.execute(
                select(accounts.c.cash, reserved_q, same_q, held_q)
                .where(accounts.c.id == acct.id)
                .with_for_update(of=accounts)
            )
        ).one()
        # What the replaced order holds is counted in `order_holds` until the book replaces it.
        replaced_open = replaced["qty"] - replaced["filled_qty"] if replaced["qty"] is not None else ZERO
        return await self._needed_buying_power(
            acct,
            spec,
            ref_price,
            replaced["reserved"],
            row[0],
            row[1],
            Decimal(row[2]) - replaced_open,
            row[3],
        )

    async def _needed_buying_power(
        self,
        acct: AccountInfo,
        spec: OrderSpec,
        ref_price: Decimal,
        released: Decimal,
        cash: Decimal,
        reserved_sum: Any,
        same_side_sum: Any,
        held_json: Any,
        short_prices: Mapping[str, Decimal] | None = None,
    ) -> Decimal:
        """Check the order fits what the locked account row says; returns the buying power it reserves."""
        reserved_total, open_same_side = Decimal(reserved_sum), Decimal(same_side_sum)
        held = {sym: Decimal(q) for sym, q in (held_json or [])}
        position_qty = held.get(spec.symbol, ZERO)
        if spec.notional is not None:
            needed = spec.notional if spec.side is Side.BUY else ZERO
            qty_for_check = None
        else:
            assert spec.qty is not None
            qty_for_check = spec.qty
            needed = reservation(spec.side, spec.qty, ref_price, position_qty, open_same_side)
        if spec.side is Side.SELL and not acct.shorting_enabled:
            available = max(position_qty - open_same_side, ZERO)
            if qty_for_check is None or qty_for_check > available:
                requested = fmt(qty_for_check) if qty_for_check is not None else "notional"
                raise ApiError.forbidden(
                    f"insufficient qty available for order (requested: {requested}, available: {fmt(available)});"
                    " shorting is disabled for this account"
                )
        if needed > 0 and ref_price == 0 and spec.notional is None:
            raise ApiError.forbidden(
                f"insufficient buying power: no price is known for {spec.symbol} to size a market order"
            )
        shorts = {s: q for s, q in held.items() if q < 0}
        if short_prices is not None:
            prices = {s: short_prices[s] for s in shorts if s in short_prices}
        else:
            prices = await self.market.prices(shorts) if shorts else {}
        _, short_mv = market_values((q, prices.get(s, ZERO)) for s, q in shorts.items())
        available_bp = buying_power(Decimal(cash), short_mv, reserved_total - released)
        if needed > available_bp:
            raise ApiError.forbidden(
                f"insufficient buying power (required: {fmt(needed.quantize(Decimal('0.01')))}, "
                f"available: {fmt(available_bp.quantize(Decimal('0.01')))})"
            )
        return needed

    async def _route_new(self, account_id: UUID, symbol: str, payload: bytes, order_id: UUID) -> None:
        """Publish a new order's command; JetStream's ack is awaited in the background.

        The command is on the wire (in order with any later cancel of it) when this returns. Its ack
        comes on this desk's one reply subscription (`<inbox>.<n>`; not nats-py's `publish_async`, whose
        future, semaphore, random token and decoded `PubAck` per order cost ~5 % of the broker's CPU per
        order). If the ack does not come (`PUBLISH_ACK_TIMEOUT`) or refuses the command, the order is
        rejected in Postgres, the book is told to cancel it (in case the command was stored after all)
        and risk gets its exposure back; a publish that fails at once does the same and answers 503."""
        self._ack_count += 1
        n = self._ack_count
        # Waiting before the publish: a publish that waits for room in the client's buffer may see
        # its ack come first.
        timer = asyncio.get_running_loop().call_later(PUBLISH_ACK_TIMEOUT, self._ack_missing, n)
        self._unacked[n] = _Unacked(account_id, symbol, order_id, timer)
        try:
            prefix = self._ack_prefix or await self._ack_inbox()
            await self.ctx.links.nats.publish(
                subjects.ex_cmd(symbol),
                payload,
                reply=f"{prefix}{n}",
                headers={"Nats-Msg-Id": f"{order_id}:new"},
            )
        except Exception as exc:
            timer.cancel()
            self._unacked.pop(n, None)
            reason = f"orderbook command stream unavailable: {type(exc).__name__}"
            await self._unrouted(account_id, symbol, order_id, reason)
            raise ApiError(503, reason) from None

    async def _ack_inbox(self) -> str:
        """The reply subjects' prefix of the commands' acks (subscribed on the first command)."""
        async with self._ack_init:
            if self._ack_prefix is None:
                prefix = self.ctx.links.nats.new_inbox() + "."
                await self.ctx.links.nats.subscribe(prefix + "*", cb=self._on_ack)
                self._ack_prefix = prefix
        return self._ack_prefix

    async def _on_ack(self, msg: Msg) -> None:
        """JetStream's answer to a new order's command: stored, or refused (the order is unrouted)."""
        waiting = self._unacked.pop(int(msg.subject.rsplit(".", 1)[1]), None)
        if waiting is None:
            return  # after its timeout: the order was rejected then
        waiting.timer.cancel()
        why = ack_refusal(msg.headers, msg.data)
        if why is not None:
            self._not_stored(waiting, why)

    def _ack_missing(self, n: int) -> None:
        waiting = self._unacked.pop(n, None)
        if waiting is not None:
            self._not_stored(waiting, "no ack")

    def _not_stored(self, waiting: _Unacked, why: str) -> None:
        reason = f"orderbook command stream unavailable: {why}"
        self.ctx.spawn(
            self._unrouted(waiting.account_id, waiting.symbol, waiting.order_id, reason), "unrouted-order"
        )

    async def _unrouted(self, account_id: UUID, symbol: str, order_id: UUID, reason: str) -> None:
        """A new order whose command JetStream did not ack: rejected here if still pending_new (risk
        released), and canceled at the book in case the command got there."""
        rejected = await recovery.reject_unrouted(self.engine, order_id, reason)
        if rejected is not None:
            _log.warning("order command not acked; order rejected", order_id=str(order_id), reason=reason)
            await self._release_risk(account_id, symbol, order_id, reason)
            await self._announce_rejected(rejected)
        # The command may have been stored after all (a lost ack): then the book cancels the order
        # and its report releases risk; a book that never saw it refuses the cancel, which changes
        # nothing for the rejected order.
        cancel = CancelCmd(order_id=order_id, account_id=account_id, symbol=symbol, t=utcnow(), reason=reason)
        try:
            await self.ctx.links.nats.publish(subjects.ex_cmd(symbol), codec.encode(cancel))
        except Exception as exc:
            _log.warning("cancel of an unrouted order not sent", order_id=str(order_id), error=repr(exc))

    async def _route(self, symbol: str, payload: bytes, msg_id: str, order_id: UUID) -> None:
        """Publish a command; if the bus refuses it, the order is rejected (never left pending)."""
        try:
            await self._publish(symbol, payload, msg_id)
        except ApiError:
            await recovery.reject_unrouted(self.engine, order_id, "orderbook unreachable")
            raise

    async def _announce_rejected(self, row: Mapping[str, Any]) -> None:
        """The trade update of an order the broker rejected after answering it (no book report will
        come for it); never raises."""
        update_ = TradeUpdate(event="rejected", order=order_view(row), timestamp=row["updated_at"])
        try:
            await self.ctx.links.nats.publish(subjects.broker_event(row["account_id"]), codec.encode(update_))
        except Exception as exc:  # the link is down: the order's state is in Postgres all the same
            _log.warning("trade update not sent", order_id=str(row["id"]), error=repr(exc))

    async def _release_risk(self, account_id: UUID, symbol: str, order_id: UUID, reason: str) -> None:
        """Tell risk (`risk.release`) that an order it approved never reached the book; never raises."""
        cmd = CancelCmd(order_id=order_id, account_id=account_id, symbol=symbol, t=utcnow(), reason=reason)
        try:
            await self.ctx.links.nats.publish(subjects.RISK_RELEASE, codec.encode(cmd))
        except Exception as exc:  # the link is down: risk keeps the reservation (tighter, never looser)
            _log.warning("risk.release not sent", order_id=str(order_id), error=repr(exc))

    async def _publish(self, symbol: str, payload: bytes, msg_id: str) -> None:
        try:
            await self.ctx.links.js.publish(
                subjects.ex_cmd(symbol), payload, timeout=5.0, headers={"Nats-Msg-Id": msg_id}
            )
        except Exception as exc:
            raise ApiError(503, f"orderbook command stream unavailable: {type(exc).__name__}") from None

    async def _by_coid(self, account_id: UUID, coid: str) -> RowMapping | None:
        async with self.engine.connect() as conn:
            return (
                (
                    await conn.execute(
                        select(orders).where(
                            orders.c.account_id == account_id, orders.c.client_order_id == coid
                        )
                    )
                )
                .mappings()
                .first()
            )

    async def _order_for_update(self, conn: AsyncConnection, account_id: UUID, order_id: UUID) -> RowMapping:
        row = (
            (
                await conn.execute(
                    select(orders)
                    .where(orders.c.id == order_id, orders.c.account_id == account_id)
                    .with_for_update()
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise ApiError.not_found(f"order {order_id} not found")
        return row


@dataclass(frozen=True, slots=True)
class _Unacked:
    """A new order's command published, its ack not yet in."""

    account_id: UUID
    symbol: str
    order_id: UUID
    timer: asyncio.TimerHandle


def _reserved_by(account_id: UUID) -> Select[tuple[Any]]:
    """The buying power the account's open orders hold (`order_holds`)."""
    return select(func.coalesce(func.sum(order_holds.c.reserved), 0)).where(
        order_holds.c.account_id == account_id
    )


def _admin_account(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "account_number": row["account_number"],
        "cash": fmt(row["cash"]),
        "created_at": msgspec.json.decode(codec.encode(row["created_at"])),
        "shorting_enabled": bool(row["shorting_enabled"]),
        "commission": CommissionModel.parse(row["commission"]).to_dict(),
        "self_trade_prevention": row["self_trade_prevention"],
    }


def _decided(spec: OrderSpec, decision: RiskDecision) -> OrderSpec:
    """The order risk's decision leaves to book (clipped, or as it was), or the ApiError refusing it."""
    if decision.decision == "approve":
        return spec
    if decision.decision == "clip":
        if spec.notional is not None and decision.notional is not None:
            if decision.notional <= 0:
                raise ApiError.forbidden(f"risk: {decision.reason or 'clipped to nothing'}")
            return _with(spec, notional=min(decision.notional, spec.notional))
        clipped = decision.qty
        if clipped is None or clipped <= 0:
            raise ApiError.forbidden(f"risk: {decision.reason or 'clipped to nothing'}")
        if spec.qty is not None and clipped >= spec.qty:
            return spec
        return _with(spec, qty=clipped, notional=None)
    reason = decision.reason or decision.rule or "rejected"
    if decision.throttled:
        raise ApiError(429, f"risk: {reason}")
    raise ApiError.forbidden(f"risk: {reason}")


def _apply_spec(item: hotpath.NewOrder[AccountInfo, OrderSpec], spec: OrderSpec) -> None:
    """Book `item` as `spec` (risk's clip): the order and its row."""
    item.spec = spec
    item.values["qty"] = spec.qty
    item.values["notional"] = spec.notional


def _with(spec: OrderSpec, **changes: Any) -> OrderSpec:
    return dataclasses.replace(spec, **changes)


def _client_order_id(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 128 or "\x00" in value:
        raise ValidationError("client_order_id", "must be 1 to 128 characters (no NUL)")
    return value


def _enum(cls: type[_E], value: object, field: str) -> _E:
    try:
        return cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(e.value for e in cls)
        raise ValidationError(field, f"must be one of {allowed}, got {value!r}") from None


def _price(value: object, field: str, needed: bool, tick: Decimal) -> Decimal | None:
    if value is None:
        if needed:
            raise ValidationError(field, "is required for this order type")
        return None
    if not needed:
        raise ValidationError(field, "is not allowed for this order type")
    price = to_decimal(value, field, positive=True)
    return check_tick(price, tick, field)


def _new_order_cmd(item: hotpath.NewOrder[AccountInfo, OrderSpec]) -> NewOrderCmd:
    """A booked order's command to its book."""
    acct, spec = item.account, item.spec
    return NewOrderCmd(
        order_id=item.values["id"],
        account_id=acct.id,
        symbol=spec.symbol,
        side=spec.side,
        type=spec.type,
        time_in_force=spec.time_in_force,
        t=item.t,
        qty=spec.qty,
        notional=spec.notional,
        limit_price=spec.limit_price,
        stop_price=spec.stop_price,
        all_or_none=spec.all_or_none,
        stp=acct.stp,
    )
