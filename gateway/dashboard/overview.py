"""The Overview page: summary cards, charts and spend over a chosen range."""

from __future__ import annotations

from flask import render_template, request

from gateway import charts, ledger, registry, settings, stats
from gateway.dashboard.blueprint import bp
from gateway.models import STATUSES, ApiKey


@bp.get("/")
def overview():
    range_key = request.args.get("range") or settings.overview_range()
    if range_key not in stats.RANGES:
        range_key = settings.overview_range()
    data = stats.overview(range_key)
    spend = ledger.ledger(data.since)
    return render_template(
        "dashboard/overview.html",
        data=data,
        ranges=stats.RANGES,
        charts=charts.overview(data, STATUSES),
        spend=spend,
        keys={k.id: k for k in ApiKey.select()},
        providers=registry.provider_names(set(spend.by_provider)),
    )
