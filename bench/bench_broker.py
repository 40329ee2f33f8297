"""The broker's whole path: HTTP submit -> risk -> orderbook -> execution -> Postgres -> trade update.

    .venv/bin/python bench/bench_broker.py            # ~10 s of load
    .venv/bin/python bench/bench_broker.py --full     # 60 s of load (the issue's figure)

Method. Embedded NATS/Postgres/Redis (or NATS_URL/DATABASE_URL/REDIS_URL), the real risk, orderbook
(synthetic liquidity off) and broker processes started with `papertrade.stack.launch`, one symbol
in the watchlist. Orders are limit orders at one price, alternating buy and sell, so every sell
crosses a resting buy and both sides fill: each order makes an `accepted` report and a fill.

- single: one client, sequential (a minimal HTTP/1.1 client on one keep-alive connection: aiohttp
  costs ~0.2 ms of CPU per request on the same two cores). submit-to-ack = POST /v2/orders until
  its 200 (the order is validated, risk answered over NATS, the order committed to Postgres and its
  command on its way to the book; JetStream's ack of it is awaited in the background).
  submit-to-fill-update = POST sent until this process receives the order's `fill` trade
  update on `broker.event.<account>` (book matched, report consumed, ledger committed, published).
- load: 50 concurrent clients for the duration, 50 accounts (even ones buy, odd ones sell); orders/s =
  200 answers per second; errors = any other answer or a transport error. The clients are wrk (a C
  load generator: `apt-get install wrk`) when it is installed, else aiohttp (`--loadgen` chooses): an
  aiohttp client costs about 0.3 ms of CPU per request here, a third of what the whole stack may
  spend per order at 2,000/s on two cores, and would measure itself. wrk's connections cycle over
  the accounts (a Lua script); aiohttp gives each client one connection and one account. Both warm
  up first (until every key pair has been verified once: the first request of a pair pays scrypt). After the load,
  the broker must book every fill: the bench accounts' fill reports in the exec stream (read after the
  load) = execution rows in Postgres. fill-to-commit = the ledger's histogram
  `papertrade_broker_fill_to_commit_seconds` over the load (a fill report's storage in the exec
  stream, JetStream's clock, until the ledger's commit that books it; p50 / p99 interpolated within
  its buckets, the share within 50 ms exact). `--observe` also times every fill live in this
  process (report seen on `ex.exec.>` -> its trade update seen on `broker.event.>`: an upper bound
  that includes publishing the update), at ~0.05 ms of this process's CPU per order.
Floors: the HTTP floor (`floor_http.py`: a minimal FastAPI POST) is measured in the same run with the
same client code (the same sequential client, then the same load generator), once the stack is idle; the
ratios of the HTTP figures are to it. NATS request/reply and a Postgres commit are re-measured in the
same run too; ../shared/bench/FLOORS.md's figures are printed beside (the machine's speed varies
between days: compare ratios from one run). Writes bench/results/broker.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import nats  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from _rows import interpreter, row  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from papertrade import keys  # noqa: E402
from papertrade.bus import subjects  # noqa: E402
from papertrade.stack.infra import Endpoints, Infra, create_database  # noqa: E402
from papertrade.stack.launch import service_env, service_url, start_service, wait_ready  # noqa: E402
from papertrade.stack.procs import ManagedProcess, free_port  # noqa: E402
from papertrade.stack.services import spec  # noqa: E402

ADMIN_TOKEN = "bench-admin-token"
SYMBOL = "BNCH"
PRICE = "100"
RESULTS = ROOT / "bench" / "results" / "broker.json"

WRK_THREADS = 2  # one per core
FLOOR_HTTP_RPS = 4940.0  # FLOORS.md: minimal FastAPI POST, 50 connections, wrk
FLOOR_HTTP_P50_MS = 0.29  # FLOORS.md: same, sequential, raw-socket client
FLOOR_HTTP_P99_MS = 0.51
FLOOR_RR_P50_MS = 0.37  # FLOORS.md: NATS request/reply
FLOOR_PG_P50_MS = 0.54  # FLOORS.md: a one-row Postgres commit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="60 s of load (default ~10 s)")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--single", type=int, default=1000, help="sequential orders for the latency figures")
    parser.add_argument(
        "--resting",
        type=int,
        default=0,
        help="open orders the single-order accounts hold (far from the price) before their figures",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="the load generator (auto: wrk when installed)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="pace the load at this many orders/s in all (wrk only; default: as fast as the stack answers)",
    )
    parser.add_argument(
        "--observe",
        action="store_true",
        help="also time every fill live in this process (report seen -> trade update seen; costs CPU)",
    )
    args = parser.parse_args()
    seconds = args.seconds or (60.0 if args.full else 10.0)
    loadgen = _loadgen(args.loadgen)
    if args.rate is not None and loadgen != "wrk":
        parser.error("--rate needs wrk as the load generator")
    console = Console()
    with ExitStack() as stack:
        endpoints = _endpoints(stack)
        env, durable = _env(endpoints)
        logs = Path(
            os.environ.get("BENCH_LOG_DIR")
            or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-broker-logs-"))
        )
        _prepare_redis(endpoints.redis_url)
        console.print(f"infra: {endpoints.env()}")
        console.print(f"interpreter: {interpreter()}")
        console.print("starting risk, orderbook, broker ...")
        procs: list[ManagedProcess] = []
        urls: dict[str, str] = {}
        try:
            for name in ("risk", "orderbook", "broker"):
                s = spec(name)
                full = service_env(s, env, {name: free_port()})
                proc = start_service(s, full, logs)
                procs.append(proc)
                urls[name] = service_url(s, full)
                wait_ready(proc, urls[name], timeout=120)
            _wait_symbol(urls["orderbook"])
            pids = {p.name: p.pid for p in procs if p.pid is not None}
            figures = asyncio.run(
                _run(
                    urls["broker"],
                    endpoints,
                    durable,
                    args.clients,
                    seconds,
                    args.single,
                    args.resting,
                    console,
                    pids,
                    loadgen,
                    args.observe,
                    args.rate,
                )
            )
        finally:
            for proc in reversed(procs):
                proc.stop()
        console.print("the HTTP floor (the stack stopped), with the same clients ...")
        with _floor_server() as floor_url:
            figures |= asyncio.run(_http_floor(floor_url, args.clients, seconds, args.single, loadgen))
    _report(figures, seconds, args.clients, console)
    return 0


async def _run(
    url: str,
    ep: Endpoints,
    durable: str,
    clients: int,
    seconds: float,
    single: int,
    resting: int,
    console: Console,
    pids: dict[str, int],
    loadgen: str,
    observe: bool,
    rate: float | None,
) -> dict[str, Any]:
    accounts = _accounts(url, clients + 2)
    observer = _Observer({a["id"] for a in accounts})
    await observer.start(ep.nats_url, None if observe else [a["id"] for a in accounts[:2]])
    figures: dict[str, Any] = {"resting": resting}
    if resting:
        console.print(f"resting orders: {resting} open orders on the single-order accounts ...")
        await _rest(url, accounts[0], accounts[1], resting)
    console.print(f"single-order latency: {single} sequential orders ...")
    figures |= await _single(url, accounts[0], accounts[1], observer, single)
    committed_before = _fill_to_commit(_metrics(url))
    console.print(f"load: {clients} clients ({loadgen}) for {seconds:g} s ...")
    samplers: list[_CpuSampler] = []

    def counting() -> None:  # from the end of the warm-up
        samplers.append(_CpuSampler(pids))

    if loadgen == "wrk":
        figures |= await _load_wrk(url, accounts[2:], seconds, counting, rate)
    else:
        figures |= await _load(url, accounts[2:], seconds, counting)
    figures["loadgen"] = loadgen
    figures["rate"] = rate
    cpu = samplers[0]  # from the end of the warm-up (first requests of a key pair pay its scrypt)
    used = cpu.seconds()
    if "loadgen_cpu" in figures:  # wrk's own CPU (its rusage), counted with the clients
        used["bench (clients)"] = used.get("bench (clients)", 0.0) + figures["loadgen_cpu"]
        used["bench (clients): wrk"] = figures["loadgen_cpu"]
    figures["load_cpu"] = {k: 100.0 * v / max(figures["load_seconds"], 1e-9) for k, v in used.items()}
    figures["load_cpu_ms_per_order"] = {k: 1000 * v / max(figures["load_ok"], 1) for k, v in used.items()}
    figures["loadavg"] = os.getloadavg()[0]
    console.print("waiting for the ledger to book every fill ...")
    figures |= await _settle(ep, durable, observer, {a["id"] for a in accounts[2:]})
    metrics = _metrics(url)
    figures |= _fill_to_commit_figures(committed_before, _fill_to_commit(metrics))
    figures |= _ledger_metrics(metrics)
    figures |= await _floors(ep)
    await observer.stop()
    return figures


# --- phases -------------------------------------------------------------------------------------------


async def _single(
    url: str, buyer: dict[str, Any], seller: dict[str, Any], obs: _Observer, n: int
) -> dict[str, Any]:
    ack, sent = await _sequential(url, buyer, seller, n)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and not all(oid in obs.filled_at for oid in sent):
        await asyncio.sleep(0.05)
    to_fill = [obs.filled_at[oid] - t for oid, t in sent.items() if oid in obs.filled_at]
    return {
        "single_ack_p50": _pct(ack, 50),
        "single_ack_p99": _pct(ack, 99),
        "single_fill_p50": _pct(to_fill, 50),
        "single_fill_p99": _pct(to_fill, 99),
        "single_n": len(ack),
        "single_missing_fills": len(sent) - len(to_fill),
    }


async def _sequential(
    url: str, buyer: dict[str, Any], seller: dict[str, Any], n: int
) -> tuple[list[float], dict[str, float]]:
    """`n` orders one after the other (after 50 of warm-up), buys and sells in turn: each one's
    submit-to-answer seconds, and when each order (by id) was sent. One keep-alive connection and a
    minimal client (`_RawHttp`): aiohttp spends ~0.2 ms of CPU per request, on the two cores the
    stack runs on."""
    ack: list[float] = []
    sent: dict[str, float] = {}
    client = await _RawHttp.connect(url)
    try:
        for i in range(n + 50):
            acct = buyer if i % 2 == 0 else seller
            body = _order_body("buy" if i % 2 == 0 else "sell")
            t0 = time.perf_counter()
            status, data = await client.post("/v2/orders", orjson.dumps(body), _headers(acct))
            t1 = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"single order failed: {status} {data[:200]!r}")
            if i >= 50:  # warm-up excluded
                ack.append(t1 - t0)
                sent[orjson.loads(data)["id"]] = t0
    finally:
        client.close()
    return ack, sent


class _RawHttp:
    """HTTP/1.1 POSTs one at a time on one keep-alive connection: the request written whole, the
    answer read by its Content-Length (what the broker and the floor send)."""

    def __init__(self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> _RawHttp:
        parsed = httpx.URL(url)
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        return cls(f"{parsed.host}:{parsed.port}", reader, writer)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-length: {len(body)}\r\n{lines}\r\n"
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *fields = raw.decode("latin-1").split("\r\n")
        length = None
        for field in fields:
            name, _, value = field.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"answer without content-length: {raw[:200]!r}")
        return int(status_line.split(" ", 2)[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _rest(url: str, buyer: dict[str, Any], seller: dict[str, Any], n: int) -> None:
    """`n` open orders, half each: buys of `buyer` at half the price, sells of `seller` at 1.5 times it
    (they never cross: the single orders' submit cost with an account's open orders)."""
    far = {"buy": str(int(PRICE) // 2), "sell": str(int(PRICE) * 3 // 2)}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        acct, side = (buyer, "buy") if i % 2 == 0 else (seller, "sell")
        body = _order_body(side) | {"limit_price": far[side]}
        async with session.post(f"{url}/v2/orders", data=orjson.dumps(body), headers=_headers(acct)) as r:
            if r.status != 200:
                raise RuntimeError(f"resting order failed: {r.status} {(await r.read())[:200]!r}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
        for start in range(0, n, 16):
            await asyncio.gather(*(one(session, i) for i in range(start, min(start + 16, n))))


@contextlib.contextmanager
def _floor_server() -> Iterator[str]:
    """`floor_http.py` on a free port, ready: its URL."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "floor_http.py"), "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/v2/account", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr and proc.poll() is not None else b""
                raise RuntimeError(f"the HTTP floor server did not start: {err[-500:]!r}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def _http_floor(url: str, clients: int, seconds: float, single: int, loadgen: str) -> dict[str, Any]:
    """The HTTP floor in this run, driven by the very client code that drives the broker: sequential
    p50 / p99, and req/s under the same load generator (at most 10 s)."""
    fake = [{"api_key_id": f"FLOOR{i}", "api_secret_key": "floor"} for i in range(clients)]
    ack, _ = await _sequential(url, fake[0], fake[1], single)
    load = _load_wrk if loadgen == "wrk" else _load
    figures = await load(url, fake, min(seconds, 10.0), lambda: None)
    return {
        "floor_http_p50": _pct(ack, 50),
        "floor_http_p99": _pct(ack, 99),
        "floor_http_rps": figures["load_rps"],
    }


async def _load(
    url: str, accounts: list[dict[str, Any]], seconds: float, counting: Callable[[], None]
) -> dict[str, Any]:
    """`seconds` of load counted after a warm-up: at least 2 s, and until every client has had an
    answer (a key pair's first request pays its scrypt verification)."""
    ok = 0
    errors = 0
    error_samples: list[str] = []
    latencies: list[float] = []
    window = [float("inf"), float("inf")]  # counted from, stop at
    answered: set[int] = set()
    all_answered = asyncio.Event()

    async def worker(i: int, session: aiohttp.ClientSession, acct: dict[str, Any]) -> None:
        nonlocal ok, errors
        side = "buy" if i % 2 == 0 else "sell"
        headers = _headers(acct)
        payload = orjson.dumps(_order_body(side))
        while True:
            now = time.perf_counter()
            if now >= window[1]:
                return
            try:
                async with session.post(f"{url}/v2/orders", data=payload, headers=headers) as r:
                    data = await r.read()
                    status = r.status
            except Exception as exc:  # transport errors count as errors
                status, data = -1, repr(exc).encode()
            t1 = time.perf_counter()
            answered.add(i)
            if len(answered) == len(accounts):
                all_answered.set()
            if now < window[0]:
                continue
            if status == 200:
                ok += 1
                latencies.append(t1 - now)
            else:
                errors += 1
                if len(error_samples) < 5:
                    error_samples.append(f"{status} {data[:160]!r}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(accounts) + 5)) as session:
        tasks = [asyncio.create_task(worker(i, session, a)) for i, a in enumerate(accounts)]
        await asyncio.gather(asyncio.sleep(min(2.0, seconds / 5)), asyncio.wait_for(all_answered.wait(), 120))
        window[0] = time.perf_counter()
        window[1] = window[0] + seconds
        counting()
        await asyncio.gather(*tasks)
    elapsed = window[1] - window[0]
    return {
        "load_ok": ok,
        "load_errors": errors,
        "load_error_samples": error_samples,
        "load_rps": ok / elapsed if elapsed > 0 else 0.0,
        "load_p50": _pct(latencies, 50),
        "load_p99": _pct(latencies, 99),
        "load_seconds": elapsed,
    }


async def _load_wrk(
    url: str,
    accounts: list[dict[str, Any]],
    seconds: float,
    counting: Callable[[], None],
    rate: float | None = None,
) -> dict[str, Any]:
    """`seconds` of load from wrk (one thread per core, one connection per client), after every key
    pair has been verified once (its scrypt is not part of the load) and a warm-up run that has every
    account submit at least once; with `rate`, paced at that many requests/s in all (`_wrk_script`)."""
    async with aiohttp.ClientSession() as session:

        async def verified(acct: dict[str, Any]) -> None:
            async with session.get(f"{url}/v2/account", headers=_headers(acct)) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET /v2/account answered {r.status}: {await r.text()}")

        await asyncio.gather(*(verified(a) for a in accounts))
    with tempfile.TemporaryDirectory(prefix="bench-broker-wrk-") as tmp:
        script = Path(tmp) / "orders.lua"
        script.write_text(_wrk_script(accounts))
        target = f"{url}/v2/orders"
        warm = ["wrk", "-t1", f"-c{len(accounts)}", "-d2s", "-s", str(script), target]
        await asyncio.to_thread(subprocess.run, warm, capture_output=True, check=True)
        if rate is not None:
            script.write_text(_wrk_script(accounts, rate / WRK_THREADS))
        threads, connections = f"-t{WRK_THREADS}", f"-c{len(accounts)}"
        argv = ["wrk", threads, connections, f"-d{seconds:g}s", "--latency", "-s", str(script), target]
        counting()
        start = time.perf_counter()
        out, cpu = await asyncio.to_thread(_run_timed, argv)
        elapsed = time.perf_counter() - start
    total = int(_wrk_figure(out, r"(\d+) requests in"))
    bad = int(_wrk_figure(out, r"Non-2xx or 3xx responses: (\d+)", "0"))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    transport = sum(int(g) for g in sock.groups()) if sock else 0
    ok = total - bad
    samples = re.findall(r"^ERR (\d+) (.*)$", out, flags=re.MULTILINE)
    return {
        "load_ok": ok,
        "load_errors": bad + transport,
        "load_error_samples": [f"{code} {body[:160]}" for code, body in samples[:5]],
        "load_rps": ok / elapsed if elapsed > 0 else 0.0,
        "load_p50": _wrk_latency(out, "50%"),
        "load_p99": _wrk_latency(out, "99%"),
        "load_seconds": elapsed,
        "loadgen_cpu": cpu,
    }


def _wrk_script(accounts: list[dict[str, Any]], thread_rate: float | None = None) -> str:
    """wrk's Lua: each request is the next account's order (even accounts buy, odd ones sell); any
    answer but 200 is printed (up to 5) as `ERR <status> <body>`. With `thread_rate`, each wrk thread
    sends at most that many requests/s: every request takes the thread's next slot (a monotonic clock
    through LuaJIT's FFI) and its connection waits for it; slots missed while every connection was
    busy are not made up (the rate reached is what is reported)."""
    lines = ["local orders = {}"]
    for i, acct in enumerate(accounts):
        headers = ", ".join(f'["{k}"] = "{v}"' for k, v in _headers(acct).items())
        body = orjson.dumps(_order_body("buy" if i % 2 == 0 else "sell")).decode().replace("'", "\\'")
        lines.append(f"orders[#orders + 1] = {{headers = {{{headers}}}, body = '{body}'}}")
    lines.append(
        """
local n = 0
local shown = 0
request = function()
  n = n + 1
  local o = orders[(n % #orders) + 1]
  return wrk.format("POST", nil, o.headers, o.body)
end
response = function(status, headers, body)
  if status ~= 200 and shown < 5 then
    shown = shown + 1
    print("ERR " .. status .. " " .. body)
  end
end
"""
    )
    if thread_rate is not None:
        lines.append(
            f"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} pt_timespec;
int clock_gettime(int clk, pt_timespec *tp);
]]
local ts = ffi.new("pt_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = {1000.0 / thread_rate!r}
local next_at = nil
delay = function()
  local t = now_ms()
  if next_at == nil or next_at < t then
    next_at = t
  end
  local wait = next_at - t
  next_at = next_at + interval
  return wait
end
"""
        )
    return "\n".join(lines)


def _run_timed(argv: list[str]) -> tuple[str, float]:
    """Run `argv` to its end: (its output, the CPU seconds it used, from its rusage)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-500:]}")
    return out, usage.ru_utime + usage.ru_stime


def _wrk_figure(out: str, pattern: str, default: str | None = None) -> str:
    m = re.search(pattern, out)
    if m is None:
        if default is not None:
            return default
        raise RuntimeError(f"unexpected wrk output: {out[-500:]}")
    return m.group(1)


def _wrk_latency(out: str, label: str) -> float | None:
    """A latency percentile of wrk's --latency table, in seconds."""
    m = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, flags=re.MULTILINE)
    if m is None:
        return None
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def _loadgen(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "aiohttp"
    if choice == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return choice


async def _settle(ep: Endpoints, durable: str, obs: _Observer, account_ids: set[str]) -> dict[str, Any]:
    """Wait until the ledger has acked every report, then count the load accounts' fills: reported
    (the fill reports in the exec stream), persisted (execution rows); with `--observe`, the live
    timings (a fill report seen -> its trade update seen)."""
    nc = await nats.connect(ep.nats_url)
    js = nc.jetstream()
    stable_since = time.perf_counter()
    deadline = time.perf_counter() + 180
    while time.perf_counter() < deadline:
        info = await js.consumer_info(subjects.STREAM_EX_EXEC, durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            if time.perf_counter() - stable_since > 2.0:
                break
        else:
            stable_since = time.perf_counter()
        await asyncio.sleep(0.2)
    fills_reported = await _stream_fills(js, account_ids)
    await nc.close()
    url = make_url(ep.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM executions WHERE account_id = ANY(%s::uuid[])", (list(account_ids),)
        ).fetchone()
    persisted = int(row[0]) if row else 0
    commit = [
        obs.update_at[k] - t
        for k, t in obs.report_at.items()
        if k in obs.update_at and obs.fill_accounts.get(k) in account_ids
    ]
    return {
        "fills_reported": fills_reported,
        "fills_persisted": persisted,
        "observed_commit_p50": _pct(commit, 50),
        "observed_commit_p99": _pct(commit, 99),
    }


async def _stream_fills(js: Any, account_ids: set[str]) -> int:
    """The distinct fill reports of `account_ids` in the exec stream (read after the load, off the clock,
    with an ordered consumer: no acks, no ack-pending limit)."""
    sub = await js.subscribe(
        subjects.EX_EXEC_ALL, stream=subjects.STREAM_EX_EXEC, ordered_consumer=True, pending_msgs_limit=-1
    )
    seen: set[tuple[str, str]] = set()
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                break
            r = orjson.loads(msg.data)
            if r.get("exec") == "fill" and r.get("account_id") in account_ids:
                seen.add((r["exec_id"], r["order_id"]))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return len(seen)


def _metrics(url: str) -> str:
    """The broker's /metrics (the ledger process's are relayed there)."""
    return httpx.get(f"{url}/metrics", timeout=10).text


def _fill_to_commit(text: str) -> dict[float, float]:
    """The ledger's fill-to-commit histogram in the broker's /metrics `text`: cumulative count per
    bucket bound (seconds; inf for +Inf)."""
    buckets: dict[float, float] = {}
    for m in re.finditer(
        r'^papertrade_broker_fill_to_commit_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
    ):
        buckets[float(m.group(1))] = float(m.group(2))
    return buckets


def _fill_to_commit_figures(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """The fills the ledger committed between two snapshots: p50 / p99 (linear within a bucket, as
    Prometheus' histogram_quantile) and the share committed within 50 ms (exact: a bucket bound)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0

    def quantile(q: float) -> float | None:
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, cum in zip(bounds, counts, strict=True):
            if cum >= rank:
                if bound == float("inf"):
                    return lower
                return lower + (bound - lower) * (rank - below) / max(cum - below, 1e-12)
            lower, below = bound, cum
        return lower

    within = dict(zip(bounds, counts, strict=True)).get(0.05)
    return {
        "fill_commit_p50": quantile(0.50),
        "fill_commit_p99": quantile(0.99),
        "fill_commit_within_50ms": within / total if within is not None and total > 0 else None,
        "fill_commit_count": total,
    }


def _ledger_metrics(text: str) -> dict[str, Any]:
    """From the broker's /metrics `text` (whole run): ledger batches, their mean size and mean
    apply+commit time."""
    values: dict[str, float] = {}
    reports = 0.0
    for line in text.splitlines():
        if line.startswith("papertrade_broker_exec_reports_total{"):
            reports += float(line.rsplit(" ", 1)[1])
        elif line.startswith("papertrade_broker_ledger_batch_seconds_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    batches = values.get("papertrade_broker_ledger_batch_seconds_count", 0.0)
    seconds = values.get("papertrade_broker_ledger_batch_seconds_sum", 0.0)
    return {
        "ledger_batches": batches,
        "ledger_batch_size": reports / batches if batches else None,
        "ledger_batch_ms": 1000 * seconds / batches if batches else None,
    }


async def _floors(ep: Endpoints) -> dict[str, Any]:
    """Re-measure two cheap floors in this run: NATS request/reply and a one-row Postgres commit."""
    nc = await nats.connect(ep.nats_url)

    async def echo(msg: Any) -> None:
        await msg.respond(b"{}")

    await nc.subscribe("bench.echo", cb=echo)
    rr: list[float] = []
    for _ in range(1200):
        t0 = time.perf_counter()
        await nc.request("bench.echo", b"{}", timeout=2)
        rr.append(time.perf_counter() - t0)
    await nc.close()
    url = make_url(ep.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    pg: list[float] = []
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TEMP TABLE bench_floor (id int)")
        conn.commit()
        for i in range(1000):
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench_floor VALUES (%s)", (i,))
            conn.commit()
            pg.append(time.perf_counter() - t0)
    return {"floor_rr_p50": _pct(rr[200:], 50), "floor_pg_p50": _pct(pg, 50)}


class _CpuSampler:
    """CPU of each service process, of its child processes apart (the broker's ledger: `<name> (child
    processes)`), and of this load generator between construction and `percent()` / `seconds()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.services = set(pids.values())
        self.start = time.perf_counter()
        self.infra0 = self._infra()
        self.cpu0 = self._all()

    def seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each process used since construction."""
        now = self._all()
        out = {name: now[name] - self.cpu0.get(name, 0.0) for name in now}
        infra = self._infra()
        if infra or self.infra0:
            out["embedded infra"] = 0.0
            for pid, (kind, t) in infra.items():
                used = t - self.infra0.get(pid, ("", 0.0))[1]
                out["embedded infra"] += used
                out[f"embedded infra: {kind}"] = out.get(f"embedded infra: {kind}", 0.0) + used
        return out

    def _all(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, p in self.procs.items():  # each process alone, its children (the ledger) apart
            out[name] = self._cpu(p, children=False)
            kids = self._cpu(p) - out[name]
            if kids > 0:
                out[f"{name} (child processes)"] = kids
        out["bench (clients)"] = self._cpu(psutil.Process(), children=False)
        return out

    def _infra(self) -> dict[int, tuple[str, float]]:
        """(kind, CPU) per process of the embedded NATS/Postgres/Redis (this process's other
        descendants); kind is the executable's name (every Postgres backend counts as postgres)."""
        out = {}
        for c in psutil.Process().children(recursive=True):
            if c.pid in self.services or any(a.pid in self.services for a in _ancestors(c)):
                continue
            with contextlib.suppress(psutil.Error):
                out[c.pid] = (_kind(c), self._cpu(c, children=False))
        return out

    def percent(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {name: 100.0 * s / wall for name, s in self.seconds().items()}

    @staticmethod
    def _cpu(p: psutil.Process, children: bool = True) -> float:
        total = 0.0
        try:
            for q in [p, *(p.children(recursive=True) if children else [])]:
                with contextlib.suppress(psutil.Error):
                    t = q.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            return float("nan")
        return total


def _kind(p: psutil.Process) -> str:
    try:
        exe = p.exe() or p.name()
    except psutil.Error:
        exe = p.name()
    name = Path(exe).name
    return "postgres" if name.startswith("postgres") else name


def _ancestors(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.parents()
    except psutil.Error:
        return []


# --- observation --------------------------------------------------------------------------------------


class _Observer:
    """Fill reports on `ex.exec.>` and trade updates on `broker.event.>`, timed on arrival."""

    def __init__(self, account_ids: set[str]) -> None:
        self.account_ids = account_ids
        self.report_at: dict[tuple[str, str], float] = {}
        self.fill_accounts: dict[tuple[str, str], str] = {}
        self.update_at: dict[tuple[str, str], float] = {}
        self.filled_at: dict[str, float] = {}
        self._nc: Any = None

    async def start(self, nats_url: str, only: list[str] | None) -> None:
        """Every report and trade update, or (`only`) just these accounts' trade updates: observing
        every order costs this process ~0.05 ms of CPU per order, on the cores the stack runs on."""
        self._nc = await nats.connect(nats_url, pending_size=512 * 1024 * 1024)
        limits = {"pending_msgs_limit": 10_000_000, "pending_bytes_limit": -1}
        if only is None:
            await self._nc.subscribe(subjects.EX_EXEC_ALL, cb=self._on_report, **limits)
            await self._nc.subscribe(subjects.BROKER_EVENT_ALL, cb=self._on_update, **limits)
        else:
            for account in only:
                await self._nc.subscribe(subjects.broker_event(account), cb=self._on_update, **limits)
        await self._nc.flush()

    async def stop(self) -> None:
        await self._nc.close()

    async def _on_report(self, msg: Any) -> None:
        t = time.perf_counter()
        r = orjson.loads(msg.data)
        if r.get("exec") != "fill" or r.get("account_id") not in self.account_ids:
            return
        key = (r["exec_id"], r["order_id"])
        if key not in self.report_at:
            self.report_at[key] = t
            self.fill_accounts[key] = r["account_id"]

    async def _on_update(self, msg: Any) -> None:
        t = time.perf_counter()
        u = orjson.loads(msg.data)
        if u.get("event") not in ("fill", "partial_fill"):
            return
        key = (u["execution_id"], u["order"]["id"])
        self.update_at.setdefault(key, t)
        if u["event"] == "fill":
            self.filled_at.setdefault(u["order"]["id"], t)


# --- setup --------------------------------------------------------------------------------------------


def _endpoints(stack: ExitStack) -> Endpoints:
    if all(os.environ.get(k) for k in ("NATS_URL", "DATABASE_URL", "REDIS_URL")):
        base = Endpoints(
            nats_url=os.environ["NATS_URL"],
            database_url=os.environ["DATABASE_URL"],
            redis_url=os.environ["REDIS_URL"],
        )
    else:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-broker-")))
        base = stack.enter_context(Infra(tmp))
    db = create_database(base.database_url, f"bench_broker_{uuid.uuid4().hex[:8]}")
    return Endpoints(nats_url=base.nats_url, database_url=db, redis_url=base.redis_url)


def _env(ep: Endpoints) -> tuple[dict[str, str], str]:
    durable = f"broker-bench-{uuid.uuid4().hex[:6]}"
    env = {
        **ep.env(),
        "PAPERTRADE_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "WARNING",
        "BROKER_LEDGER_DURABLE": durable,
        "RISK_DURABLE": f"risk-bench-{uuid.uuid4().hex[:6]}",
        "ORDERBOOK_LIQUIDITY_ENABLED": "false",
        "ORDERBOOK_WATCHLIST_POLL_SECONDS": "0.2",
        "ORDERBOOK_PUBLISH_QUOTES": "false",
    }
    return env, durable


def _prepare_redis(url: str) -> None:
    r = redis.Redis.from_url(url)
    raw = r.get(keys.WATCHLIST)
    current = orjson.loads(raw) if raw else {"symbols": [], "intervals": ["1m"]}
    symbols = sorted({*current.get("symbols", []), SYMBOL})
    r.set(keys.WATCHLIST, orjson.dumps({**current, "symbols": symbols}))
    r.set(keys.last_trade(SYMBOL), orjson.dumps({"price": PRICE, "t": "2030-01-01T00:00:00Z"}))
    r.close()


def _accounts(url: str, n: int) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as c:
        out = []
        for i in range(n):
            r = c.post("/admin/accounts", json={"name": f"bench-{i}", "cash": "1000000000"})
            r.raise_for_status()
            out.append(r.json())
        return out


def _wait_symbol(orderbook_url: str, timeout: float = 180.0) -> None:
    """The orderbook opens the symbol's book from the watchlist: wait until it lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if SYMBOL in httpx.get(f"{orderbook_url}/v1/symbols", timeout=5).json():
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the orderbook did not open a book for {SYMBOL} within {timeout:g} s")


def _headers(acct: dict[str, Any]) -> dict[str, str]:
    return {
        "APCA-API-KEY-ID": acct["api_key_id"],
        "APCA-API-SECRET-KEY": acct["api_secret_key"],
        "Content-Type": "application/json",
    }


def _order_body(side: str) -> dict[str, Any]:
    return {
        "symbol": SYMBOL,
        "qty": "1",
        "side": side,
        "type": "limit",
        "limit_price": PRICE,
        "time_in_force": "gtc",
    }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if p < 100 else max(values)


# --- report -------------------------------------------------------------------------------------------


def _report(f: dict[str, Any], seconds: float, clients: int, console: Console) -> None:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    held = f" (accounts holding {f['resting']} open orders)" if f.get("resting") else ""
    pace = f", paced at {f['rate']:g}/s" if f.get("rate") else ""
    rows: list[dict[str, Any]] = [
        row(
            f"single order submit-to-ack p50{held}",
            ms(f["single_ack_p50"]),
            "ms",
            "HTTP floor p50, this run",
            ms(f["floor_http_p50"]),
        ),
        row(
            f"single order submit-to-ack p99{held}",
            ms(f["single_ack_p99"]),
            "ms",
            "HTTP floor p99, this run",
            ms(f["floor_http_p99"]),
        ),
        row("single order submit-to-fill-update p50", ms(f["single_fill_p50"]), "ms", None, None),
        row("single order submit-to-fill-update p99", ms(f["single_fill_p99"]), "ms", None, None),
        row(
            f"{clients} clients ({f['loadgen']}{pace}), {seconds:g} s: orders/s",
            round(f["load_rps"], 1),
            "orders/s",
            f"HTTP floor req/s, this run ({f['loadgen']})",
            round(f["floor_http_rps"], 1),
        ),
        row(f"{clients} clients: submit latency p50", ms(f["load_p50"]), "ms", None, None),
        row(f"{clients} clients: submit latency p99", ms(f["load_p99"]), "ms", None, None),
        row(f"{clients} clients: errors", f["load_errors"], "count", None, None),
        row("fills reported by the book (load accounts)", f["fills_reported"], "count", None, None),
        row(
            "fills persisted in Postgres (load accounts)",
            f["fills_persisted"],
            "count",
            "fills reported",
            f["fills_reported"],
        ),
        row(
            "fill-to-commit p50 (ledger: stored in the exec stream -> committed)",
            ms(f["fill_commit_p50"]),
            "ms",
            None,
            None,
        ),
        row(
            "fill-to-commit p99 (ledger: stored in the exec stream -> committed)",
            ms(f["fill_commit_p99"]),
            "ms",
            "target",
            50.0,
        ),
        row(
            "fills committed within 50 ms",
            _round(100 * f["fill_commit_within_50ms"], 2)
            if f.get("fill_commit_within_50ms") is not None
            else None,
            "%",
            None,
            None,
        ),
        *(
            [
                row(
                    "observed: report seen -> trade update seen, p50",
                    ms(f["observed_commit_p50"]),
                    "ms",
                    None,
                    None,
                ),
                row(
                    "observed: report seen -> trade update seen, p99",
                    ms(f["observed_commit_p99"]),
                    "ms",
                    None,
                    None,
                ),
            ]
            if f.get("observed_commit_p50") is not None
            else []
        ),
        row("ledger: batches booked (whole run)", f["ledger_batches"], "count", None, None),
        row("ledger: mean reports per batch", _round(f["ledger_batch_size"], 1), "reports", None, None),
        row("ledger: mean batch apply + commit", _round(f["ledger_batch_ms"], 2), "ms", None, None),
        row(
            "floor: NATS request/reply p50 (this run)",
            ms(f["floor_rr_p50"]),
            "ms",
            "FLOORS.md",
            FLOOR_RR_P50_MS,
        ),
        row(
            "floor: Postgres one-row commit p50 (this run)",
            ms(f["floor_pg_p50"]),
            "ms",
            "FLOORS.md",
            FLOOR_PG_P50_MS,
        ),
        row(
            "floor: HTTP sequential p50 (this run, same client)",
            ms(f["floor_http_p50"]),
            "ms",
            "FLOORS.md (raw socket)",
            FLOOR_HTTP_P50_MS,
        ),
        row(
            "floor: HTTP sequential p99 (this run, same client)",
            ms(f["floor_http_p99"]),
            "ms",
            "FLOORS.md (raw socket)",
            FLOOR_HTTP_P99_MS,
        ),
        row(
            f"floor: HTTP req/s (this run, {f['loadgen']})",
            round(f["floor_http_rps"], 1),
            "req/s",
            "FLOORS.md (wrk)",
            FLOOR_HTTP_RPS,
        ),
    ]
    table = Table(title="broker: HTTP submit -> risk -> orderbook -> execution -> Postgres -> trade update")
    for col in ("figure", "value", "unit", "compare", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["figure"], str(r["value"]), r["unit"], str(r["compare"] or ""), str(r["ratio"] or ""))
    console.print(table)
    console.print(
        "CPU % during the load (100 = one core of 2): "
        + ", ".join(f"{k} {v:.0f}" for k, v in f["load_cpu"].items())
    )
    console.print(
        "CPU ms per order during the load: "
        + ", ".join(f"{k} {v:.2f}" for k, v in f["load_cpu_ms_per_order"].items())
        + f"; load average {f['loadavg']:.2f}"
    )
    rows.append(
        row(
            "machine load average (1 min) at the end of the load",
            round(f["loadavg"], 2),
            "runnable",
            None,
            None,
        )
    )
    for name, value in f["load_cpu"].items():
        rows.append(row(f"CPU during load: {name}", round(value, 1), "% of a core", None, None))
    for name, value in f["load_cpu_ms_per_order"].items():
        rows.append(row(f"CPU per order during load: {name}", round(value, 3), "ms", None, None))
    # Every process of the run once (a breakdown's parts carry a ":" and are in their whole).
    total = sum(v for k, v in f["load_cpu_ms_per_order"].items() if ":" not in k)
    cores = os.cpu_count() or 1
    ceiling = 1000 * cores / total if total else None
    rows.append(row("CPU per order during load: all processes", round(total, 3), "ms", None, None))
    rows.append(
        row(
            f"orders/s that CPU per order allows on {cores} cores",
            _round(ceiling, 0),
            "orders/s",
            "measured orders/s",
            round(f["load_rps"], 1),
        )
    )
    console.print(
        f"all processes: {total:.2f} ms of CPU per order; {cores} cores carry at most "
        f"{ceiling or 0:,.0f} orders/s at that cost (measured: {f['load_rps']:,.0f})"
    )
    if f["load_error_samples"]:
        console.print("error samples:", f["load_error_samples"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    sys.exit(main())
