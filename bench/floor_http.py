"""The HTTP floor, measured in the same run as the broker: a minimal FastAPI app on uvicorn (uvloop,
httptools, one worker, access log off), the app of ../shared/bench/floors/bench_http.py ("model"
variant): POST /v2/orders parses an Alpaca-style order with pydantic and answers a small JSON order.
GET /v2/account answers 200, so the broker bench's load generators (which verify each key pair
first) drive it unchanged.

    .venv/bin/python bench/floor_http.py --port 18080
"""

from __future__ import annotations

import argparse
import uuid
from decimal import Decimal

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class OrderIn(BaseModel):
    symbol: str
    qty: Decimal
    side: str
    type: str
    time_in_force: str
    limit_price: Decimal | None = None


class OrderOut(BaseModel):
    id: str
    status: str
    symbol: str
    qty: str
    side: str
    type: str


@app.post("/v2/orders")
async def submit(order: OrderIn) -> OrderOut:
    return OrderOut(
        id=str(uuid.uuid4()),
        status="accepted",
        symbol=order.symbol,
        qty=str(order.qty),
        side=order.side,
        type=order.type,
    )


@app.get("/v2/account")
async def account() -> dict[str, str]:
    return {"status": "ACTIVE"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    port = ap.parse_args().port
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
