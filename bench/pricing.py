"""Throughput of the OCPI tariff engine (payments.tariffs) against a trivial baseline in the same run.

Prices a set of distinct 4-period CDRs (charging across the evening peak,
then parking) with a 3-element time-of-use tariff in Europe/Madrid, on one
core, and prints CDRs priced per second for:

* ``engine``: ``compile_tariff(tariff).price(cdr, time_zone=...)``, the hot path
  (tariff compiled once, as the worker does);
* ``engine, dict``: ``price(tariff_dict, cdr)``, validating and compiling the
  tariff on every call;
* ``baseline``: the same CDRs walked period by period and priced with a
  flat-rate formula in plain Decimal arithmetic (FLAT + kWh × price, VAT),
  the least any pricing of these documents has to do;

and the ratio engine / baseline, which says what the OCPI semantics cost
independently of the machine's speed. CDRs are read as the web layer reads
JSON: ``json.loads(..., parse_float=Decimal)``.

    .venv/bin/python bench/pricing.py [seconds-per-case]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from payments.tariffs import compile_tariff, price  # noqa: E402

TZ = "Europe/Madrid"
TOU = {
    "country_code": "ES", "party_id": "VLT", "id": "tou-3", "currency": "EUR", "last_updated": "2024-01-01T00:00:00Z",
    "elements": [
        {"price_components": [{"type": "ENERGY", "price": 0.40, "vat": 21, "step_size": 1}, {"type": "TIME", "price": 1.20, "vat": 21, "step_size": 60}],
         "restrictions": {"start_time": "18:00", "end_time": "22:00", "day_of_week": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"]}},
        {"price_components": [{"type": "ENERGY", "price": 0.15, "vat": 21, "step_size": 1}],
         "restrictions": {"start_time": "22:00", "end_time": "07:00"}},
        {"price_components": [{"type": "FLAT", "price": 0.50, "vat": 21, "step_size": 1}, {"type": "ENERGY", "price": 0.25, "vat": 21, "step_size": 1},
                              {"type": "PARKING_TIME", "price": 3.00, "vat": 21, "step_size": 300}]},
    ],
}


def iso(t: datetime) -> str:
    return t.replace(tzinfo=None).isoformat() + "Z"


def make_cdrs(n: int) -> list[dict]:
    """n distinct CDRs: 30 min before the 18:00 (local) peak, 4 h of peak, 30 min after, then parking."""
    out = []
    base = datetime(2024, 4, 1, 15, 30, tzinfo=timezone.utc)  # 17:30 in Madrid (CEST)
    for i in range(n):
        start = base + timedelta(days=i % 60, minutes=(i * 7) % 40)
        peak = start.replace(minute=0) + timedelta(minutes=30) if start.minute < 30 else start.replace(minute=0) + timedelta(hours=1)
        t = [start, peak, peak + timedelta(hours=4), peak + timedelta(hours=4, minutes=30)]
        end = t[3] + timedelta(minutes=20 + i % 50)
        kw = Decimal(7 + i % 15)
        periods = []
        for j, (a, b) in enumerate(zip(t, t[1:] + [end])):
            hours = Decimal((b - a).seconds) / 3600
            dims = [{"type": "ENERGY", "volume": str((kw * hours).quantize(Decimal("0.001")) if j < 3 else 0)},
                    {"type": "TIME" if j < 3 else "PARKING_TIME", "volume": str(hours.quantize(Decimal("0.000001")))},
                    {"type": "MAX_CURRENT", "volume": "32"}]
            periods.append({"start_date_time": iso(a), "dimensions": dims, "tariff_id": "tou-3"})
        cdr = {"start_date_time": iso(start), "end_date_time": iso(end), "currency": "EUR", "charging_periods": periods}
        text = re.sub(r'"volume": "([0-9.]+)"', r'"volume": \1', json.dumps(cdr))  # JSON numbers, as sent
        out.append(json.loads(text, parse_float=Decimal))
    return out


FLAT, KWH, VAT = Decimal("0.50"), Decimal("0.25"), Decimal("1.21")


def baseline(cdr: dict) -> dict:
    """A flat rate: FLAT + energy × price, VAT on top; walks the same periods and dimensions."""
    energy = Decimal(0)
    for p in cdr["charging_periods"]:
        for d in p["dimensions"]:
            if d["type"] == "ENERGY":
                energy += d["volume"]
    excl = FLAT + energy * KWH
    return {"total_cost": {"excl_vat": excl, "incl_vat": excl * VAT}, "total_energy": energy}


def rate(fn, cdrs: list[dict], seconds: float) -> float:
    """CDRs priced per second by ``fn`` over about ``seconds`` (cycling through ``cdrs``)."""
    for c in cdrs[:50]:  # warm-up
        fn(c)
    n, start = 0, time.perf_counter()
    while True:
        for c in cdrs:
            fn(c)
        n += len(cdrs)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    cdrs = make_cdrs(1000)
    compiled = compile_tariff(TOU)
    sample = compiled.price(cdrs[0], time_zone=TZ)
    assert len(cdrs[0]["charging_periods"]) == 4 and len(TOU["elements"]) == 3
    print(f"sample CDR: total {sample['total_cost']['excl_vat']:.4f} excl. / {sample['total_cost']['incl_vat']:.4f} incl. VAT, "
          f"{len(sample['breakdown'])} breakdown lines")

    engine = rate(lambda c: compiled.price(c, time_zone=TZ), cdrs, seconds)
    engine_dict = rate(lambda c: price(TOU, c, time_zone=TZ), cdrs, seconds)
    base = rate(baseline, cdrs, seconds)
    print(f"{'engine (compiled tariff)':28} {engine:10,.0f} CDRs/s  {1e6 / engine:7.1f} µs/CDR")
    print(f"{'engine (tariff dict)':28} {engine_dict:10,.0f} CDRs/s  {1e6 / engine_dict:7.1f} µs/CDR")
    print(f"{'baseline (flat Decimal)':28} {base:10,.0f} CDRs/s  {1e6 / base:7.1f} µs/CDR")
    print(f"ratio engine / baseline: {base / engine:.1f}× the baseline's time per CDR; goal 20,000 CDRs/s: "
          f"{'met' if engine >= 20_000 else 'not met'} ({engine:,.0f})")


if __name__ == "__main__":
    main()
