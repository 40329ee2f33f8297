"""Risk's live state in Redis, changed only by one Lua script, and the ownership leases.

Keys (prefix `papertrade.keys.RISK_PREFIX`, `pt:risk:`):

| key | value |
| --- | --- |
| `own:<account>` | `"<replica> <fence>"`: the replica that owns the account's live state, with a lease (PX) |
| `fence` | counter: every lease taken gets the next value (INCR), so a lost owner's writes are refused |
| `replicas` | hash replica id -> lease end (ms, Redis clock): the live replicas (`risk.ctl` acks) |
| `a:<account>:lim` | the account's limits (JSON; `{}` = none); absent = not loaded from Postgres yet |
| `a:<account>:pos` | hash symbol -> `{"q", "a"}` position qty and average entry |
| `a:<account>:open` | hash order id -> `{"s", "d", "q", "p"}` approved orders not done (open exposure) |
| `a:<account>:day` | `{"d", "r"}` the trading day and the P&L realised on it |
| `a:<account>:rate` | hash `n` tokens, `t` unix time: the max_orders_per_second bucket |
| `kill:global` · `kill:a:<account>` | the reason text while a kill switch is engaged |
| `kill:synced` | present once the kill switches were restored from Postgres into this Redis |
| `seen:<symbol>:<seq>` | an execution report already applied (expires after 3 days) |
| `accounts` | set of accounts with state |
| `log` · `log:<account>` | capped lists of recent decisions (JSON, newest first; `audit_item`) |

One replica owns an account at a time (`own:<account>`, taken with `acq`, renewed with `ren`): it
decides from memory and writes the changes behind with one `W` item per flush (an entry per
account), each entry applied only while `own:<account>` still holds the writer's token (replica
and fence). The decisions' audit records ride in the same script call (`audit_item`). Those two run
on every flush, so they are plain script arguments that Lua reads in place (decoding them as JSON, or
matching records out of one string, was about a third of the script's time on an idle Redis); the
rare ops are one JSON argument each. The script answers one JSON document per batch (parsing nested RESP arrays
in Python is slow); calls from many concurrent callers are batched into one script call
(`LuaBatcher`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis
import orjson
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ResponseError

from papertrade.keys import RISK_PREFIX

Result = Any
Continuation = Callable[[Result | BaseException], Awaitable[None]]
#: one script item: a JSON op, or the arguments of a `W` / `A` item (`write_item`, `audit_item`)
Item = bytes | Sequence[bytes] | Sequence[str]

#: capped audit lists: per account and for all accounts
LOG_PER_ACCOUNT = 1_000
LOG_ALL = 10_000

SCRIPT = r"""
local P = ARGV[1]
local function k(a, name) return P .. 'a:' .. a .. ':' .. name end
local function snap(a)
  return {
    lim = redis.call('GET', k(a, 'lim')) or '',
    pos = redis.call('HGETALL', k(a, 'pos')),
    open = redis.call('HGETALL', k(a, 'open')),
    day = redis.call('GET', k(a, 'day')) or '',
    rate = redis.call('HMGET', k(a, 'rate'), 'n', 't'),
    kill = redis.call('GET', P .. 'kill:a:' .. a) or '',
  }
end
-- a hash's changes: ARGV[from .. to] is field, value, ...; an empty value deletes the field
local function hput(key, from, to)
  for j = from, to, 2 do
    if ARGV[j + 1] == '' then
      redis.call('HDEL', key, ARGV[j])
    else
      redis.call('HSET', key, ARGV[j], ARGV[j + 1])
    end
  end
end
local function nowms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- decision records (`audit_item`): the records are ARGV[first .. first + n - 1] (oldest first), then
-- per account its name, its record count and their positions among the records; one LPUSH per list,
-- an LTRIM only for a list past its cap
local function audit(first, last, n, cap_all, cap_one)
  if n > 0 and redis.call('LPUSH', P .. 'log', unpack(ARGV, first, first + n - 1)) > cap_all then
    redis.call('LTRIM', P .. 'log', 0, cap_all - 1)
  end
  local i = first + n
  while i <= last do
    local key, c = P .. 'log:' .. ARGV[i], tonumber(ARGV[i + 1])
    local recs = {}
    for j = 1, c do recs[j] = ARGV[first - 1 + tonumber(ARGV[i + 1 + j])] end
    if redis.call('LPUSH', key, unpack(recs)) > cap_one then
      redis.call('LTRIM', key, 0, cap_one - 1)
    end
    i = i + 2 + c
  end
  return {'log', n}
end
-- the owner's changes (`write_item`), ARGV[i .. last]: per account its name, its lease token, the
-- `open` and `pos` changes (a count of pairs, then the pairs), the day, the seen keys (a count, then
-- the keys), the rate bucket (tokens, time, '1' to refresh its TTL) and '1' if the account is new to
-- the `accounts` set. An entry is applied only while the account's lease still holds the token.
local function write(i, last)
  local st = {}
  while i <= last do
    local a = ARGV[i]
    local ok = redis.call('GET', P .. 'own:' .. a) == ARGV[i + 1]
    i = i + 2
    local n = tonumber(ARGV[i])
    if ok and n > 0 then hput(k(a, 'open'), i + 1, i + 2 * n) end
    i = i + 1 + 2 * n
    n = tonumber(ARGV[i])
    if ok and n > 0 then hput(k(a, 'pos'), i + 1, i + 2 * n) end
    i = i + 1 + 2 * n
    local day, ns = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if ok then
      if day ~= '' then redis.call('SET', k(a, 'day'), day) end
      for j = i, i + ns - 1 do redis.call('SET', ARGV[j], '1', 'EX', 259200) end
    end
    i = i + ns
    local rn, rt, rx, new = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    i = i + 4
    if ok then
      if rn ~= '' then
        redis.call('HSET', k(a, 'rate'), 'n', rn, 't', rt)
        if rx ~= '' then redis.call('EXPIRE', k(a, 'rate'), 3600) end
      end
      if new ~= '' then redis.call('SADD', P .. 'accounts', a) end
      st[#st + 1] = 'ok'
    else
      st[#st + 1] = 'fenced'
    end
  end
  return {'w', st}
end
-- the JSON ops: leases, snapshots, marks, limits, replicas
local function op_json(it)
  local op, a = it.op, it.a
  local res
  if op == 'acq' then
    local key = P .. 'own:' .. a
    local cur = redis.call('GET', key)
    if cur then
      res = {'other', cur, redis.call('PTTL', key)}
    else
      local tok = it.r .. ' ' .. redis.call('INCR', P .. 'fence')
      redis.call('SET', key, tok, 'PX', it.ms)
      res = {'own', tok, snap(a), redis.call('GET', P .. 'kill:global') or ''}
    end
  elseif op == 'ren' then
    local lost = {}
    for j = 1, #it.accts, 2 do
      local key = P .. 'own:' .. it.accts[j]
      if redis.call('GET', key) == it.accts[j + 1] then
        redis.call('PEXPIRE', key, it.ms)
      else
        lost[#lost + 1] = it.accts[j]
      end
    end
    if it.reg then redis.call('HSET', P .. 'replicas', it.r, nowms() + it.ms) end
    res = {'ren', lost, redis.call('GET', P .. 'kill:global') or ''}
  elseif op == 'rel' then
    if redis.call('GET', P .. 'own:' .. a) == it.tok then redis.call('DEL', P .. 'own:' .. a) end
    res = {'ok'}
  elseif op == 'bye' then
    redis.call('HDEL', P .. 'replicas', it.r)
    res = {'ok'}
  elseif op == 'live' then
    local now, live = nowms(), {}
    local all = redis.call('HGETALL', P .. 'replicas')
    for j = 1, #all, 2 do
      if tonumber(all[j + 1]) > now then
        live[#live + 1] = all[j]
      else
        redis.call('HDEL', P .. 'replicas', all[j])
      end
    end
    res = {'live', live}
  elseif op == 'who' then
    local key = P .. 'own:' .. a
    res = {'who', redis.call('GET', key) or '', redis.call('PTTL', key)}
  elseif op == 's' then
    res = {'snap', snap(a)}
  elseif op == 'x' then
    res = {'x', redis.call('EXISTS', it.dk)}
  elseif op == 'm' then
    local marks = {}
    for j, sym in ipairs(it.syms) do
      marks[2 * j - 1] = redis.call('GET', 'pt:last:' .. sym) or ''
      marks[2 * j] = redis.call('GET', 'pt:bar:1m:' .. sym) or ''
    end
    res = {'marks', marks}
  elseif op == 'l' then
    if it.nx and redis.call('EXISTS', k(a, 'lim')) == 1 then
      res = {'exists'}
    else
      redis.call('SET', k(a, 'lim'), it.lim)
      res = {'ok'}
    end
  else
    res = {'error', 'unknown op ' .. tostring(op)}
  end
  return res
end
local out = {}
local i = 2
while i <= #ARGV do
  local head = ARGV[i]
  local c = string.byte(head, 1)
  if c == 87 then  -- 'W<count>': the owner's changes, in the next <count> arguments (`write_item`)
    local last = i + tonumber(string.sub(head, 2))
    out[#out + 1] = write(i + 1, last)
    i = last
  elseif c == 65 then  -- 'A<count> <records> <cap all> <cap one>': decision records (`audit_item`)
    local cnt, n, cap_all, cap_one = string.match(head, '^A(%d+) (%d+) (%d+) (%d+)')
    local last = i + tonumber(cnt)
    out[#out + 1] = audit(i + 1, last, tonumber(n), tonumber(cap_all), tonumber(cap_one))
    i = last
  else
    out[#out + 1] = op_json(cjson.decode(head))
  end
  i = i + 1
end
return cjson.encode(out)
"""


def account_key(account: str, name: str) -> str:
    return f"{RISK_PREFIX}a:{account}:{name}"


KILL_GLOBAL = f"{RISK_PREFIX}kill:global"
KILL_SYNCED = f"{RISK_PREFIX}kill:synced"
ACCOUNTS = f"{RISK_PREFIX}accounts"
LOG = f"{RISK_PREFIX}log"


def kill_account_key(account: str) -> str:
    return f"{RISK_PREFIX}kill:a:{account}"


def log_key(account: str) -> str:
    return f"{RISK_PREFIX}log:{account}"


def seen_key(symbol: str, seq: int) -> str:
    return f"{RISK_PREFIX}seen:{symbol}:{seq}"


def audit_item(records: list[tuple[str, bytes]]) -> list[bytes]:
    """A script item that prepends decision records (account id, record JSON; oldest first) to the
    capped lists `log` and `log:<account>`: a head `A<count> <records> <cap all> <cap one>`, each
    record once, then per account its id, its count and the records' positions (the script reads
    arguments; nothing is parsed or encoded again on either side)."""
    out: list[bytes] = [b""]
    positions: dict[str, list[bytes]] = {}
    for n, (account, record) in enumerate(records, 1):
        out.append(record)
        positions.setdefault(account, []).append(b"%d" % n)
    for account, where in positions.items():
        out += (account.encode(), b"%d" % len(where), *where)
    out[0] = b"A%d %d %d %d" % (len(out) - 1, len(records), LOG_ALL, LOG_PER_ACCOUNT)
    return out


def write_item(entries: list[list[str]]) -> list[str]:
    """A script item with the owner's changes, one entry per account (`write_entry`), each applied
    only while the account's lease holds the entry's token: a head `W<count>`, then the entries."""
    out = ["W"]
    for entry in entries:
        out += entry
    out[0] = f"W{len(out) - 1}"
    return out


def write_entry(
    account: str,
    token: str,
    open_changes: list[str],
    pos_changes: list[str],
    day: str,
    seen: list[str],
    rate: tuple[str, str, bool] | None,
    new: bool,
) -> list[str]:
    """One account's changes as the script reads them: `open` and `pos` as flat [field, value (''
    deletes), ...], the day record ('' unchanged), the seen keys to set, the rate bucket (tokens,
    time, refresh its TTL; None unchanged) and whether the account joins the `accounts` set."""
    entry = [account, token, str(len(open_changes) // 2), *open_changes]
    entry += [str(len(pos_changes) // 2), *pos_changes, day, str(len(seen)), *seen]
    if rate is None:
        entry += ["", "", ""]
    else:
        entry += [rate[0], rate[1], "1" if rate[2] else ""]
    entry.append("1" if new else "")
    return entry


class LuaBatcher:
    """Queue script items from many concurrent checks; one script call runs a whole batch atomically.

    At most one call is in flight: a lone check pays one round trip, a burst shares one. The calls go
    over one connection of its own speaking RESP directly (hiredis parses the answers): redis-py's
    per-call machinery (connection pool, retries, response callbacks, stream reader, per-send
    timeouts) cost more than the script takes in Redis, and this batcher needs exactly one command
    shape. Each call has one deadline (connect included); any error drops the connection (the next
    call reconnects) and fails the batch, so checks fail closed meanwhile.
    """

    def __init__(self, url: str, timeout: float = 1.0, max_batch: int = 256) -> None:
        self._where = _address(url)
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: list[tuple[Item, Continuation]] = []
        self._running = False
        self._sha: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: _Resp | None = None
        self.calls = 0
        self.items = 0

    def submit(self, item: Item, cont: Continuation) -> None:
        """Queue one item; `cont` is awaited with its result (or the exception of the call)."""
        self._queue.append((item, cont))
        if not self._running:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def call(self, item: Item) -> Result:
        """One item, awaited (for the slow paths: REST, the execution consumer).

        Never from inside a continuation: the batch loop would wait for itself.
        """
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        async def cont(result: Result | BaseException) -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.submit(item, cont)
        return await fut

    async def close(self) -> None:
        """Drop the connection (a later call would open a new one)."""
        self._drop()

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    results = await self._eval([item for item, _ in batch])
                except Exception as exc:
                    for _, cont in batch:
                        await _safe(cont, exc)
                    continue
                self.calls += 1
                self.items += len(batch)
                for (_, cont), result in zip(batch, results, strict=True):
                    await _safe(cont, result)
        finally:
            self._running = False

    async def _eval(self, items: list[Item]) -> list[Result]:
        args: list[bytes | str] = []
        for item in items:
            if isinstance(item, bytes):
                args.append(item)
            else:
                args += item
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            conn = self._conn
            if conn is None or conn.broken is not None:
                conn = await self._connect(deadline)
            if self._sha is None:
                self._sha = await conn.command(deadline, b"SCRIPT", b"LOAD", SCRIPT)
            result = await conn.command(deadline, b"EVALSHA", self._sha, b"0", RISK_PREFIX, *args)
            if isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT"):
                # Redis restarted or flushed its scripts
                self._sha = await conn.command(deadline, b"SCRIPT", b"LOAD", SCRIPT)
                result = await conn.command(deadline, b"EVALSHA", self._sha, b"0", RISK_PREFIX, *args)
        except TimeoutError:
            self._drop()
            raise TimeoutError(f"Redis did not answer within {self.timeout:g}s") from None
        except Exception:
            self._drop()
            raise
        if isinstance(result, ResponseError):
            raise result
        if not isinstance(result, bytes):
            raise ResponseError(f"unexpected answer from the risk script: {result!r}")
        decoded: list[Result] = orjson.loads(result)
        return decoded

    async def _connect(self, deadline: float) -> _Resp:
        self._drop()
        loop = asyncio.get_running_loop()
        where = self._where
        async with asyncio.timeout_at(deadline):
            if "path" in where:
                _, conn = await loop.create_unix_connection(_Resp, where["path"])
            else:
                _, conn = await loop.create_connection(
                    _Resp, where.get("host", "localhost"), where.get("port", 6379), ssl=where.get("ssl")
                )
        self._conn = conn
        password, username = where.get("password"), where.get("username")
        if password:
            auth = (b"AUTH", username, password) if username else (b"AUTH", password)
            _ok(await conn.command(deadline, *auth))
        if where.get("db"):
            _ok(await conn.command(deadline, b"SELECT", str(where["db"])))
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Resp(asyncio.Protocol):
    """One Redis connection, one command at a time: RESP out, hiredis in."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiter: asyncio.Future[Any] | None = None
        #: why the connection is unusable (closed, lost), else None
        self.broken: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            reply = self._reader.gets()
        except Exception as exc:  # a protocol error: the stream cannot be trusted any more
            self.broken = exc
            waiter.set_exception(ConnectionError(f"unreadable answer from Redis: {exc}"))
            return
        if reply is not False:
            self._waiter = None
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = exc or ConnectionError("Redis closed the connection")
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"lost the connection to Redis: {self.broken}"))

    async def command(self, deadline: float, *args: bytes | str) -> Any:
        if self.broken is not None or self._transport is None:
            raise ConnectionError(f"no connection to Redis: {self.broken}")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiter = waiter
        self._transport.write(_pack(args))
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        self.broken = self.broken or ConnectionError("closed")
        if self._transport is not None:
            self._transport.close()


def _pack(args: tuple[bytes | str, ...]) -> bytes:
    """A command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _ok(reply: Any) -> None:
    if isinstance(reply, ResponseError):
        raise reply


def _address(url: str) -> dict[str, Any]:
    """Where a `redis://`, `rediss://` or `unix://` URL points (host, port or path, db, credentials)."""
    where = dict(parse_url(url))
    if where.pop("connection_class", None) is SSLConnection:
        where["ssl"] = True
    return where


async def _safe(cont: Continuation, result: Result | BaseException) -> None:
    try:
        await cont(result)
    except Exception:  # a continuation must never break the batch loop
        import structlog

        structlog.get_logger("risk").exception("risk continuation failed")
