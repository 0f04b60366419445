"""The Providers and models page: add, edit, test and delete them, and balance weights."""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import ngettext

from gateway import redact, registry, urlargs
from gateway.dashboard.blueprint import bp
from gateway.dashboard.forms import form_body, live, number
from gateway.failures import UpstreamError
from gateway.models import Model, Provider

PROVIDER_FORM = {
    "name": str,
    "type": str,
    "baseUrl": str,
    "apiKey": str,
    "apiVersion": str,
    "comment": str,
    "streamUsage": bool,
}
MODEL_FORM = {
    "systemName": str,
    "remoteId": str,
    "modelType": str,
    "contextLength": int,
    "inputPrice": float,
    "outputPrice": float,
    "cacheReadPrice": float,
    "cacheWritePrice": float,
    "weight": float,
    "comment": str,
}


@bp.get("/providers")
def providers():
    models = list(Model.active().order_by(Model.system_name, Model.id))
    by_system: dict[str, list[Model]] = {}
    for model in models:
        by_system.setdefault(model.system_name, []).append(model)
    return render_template(
        "dashboard/providers.html",
        providers=list(Provider.active().order_by(Provider.name)),
        models=models,
        by_system=by_system,
        mask=redact.mask,
    )


@bp.post("/providers")
def create_provider():
    row = registry.add_provider(registry.provider_fields(form_body(PROVIDER_FORM), required=True))
    flash(_("Provider %(name)s added.", name=row.name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.route("/providers/<id:provider_id>", methods=["GET", "POST"])
def edit_provider(provider_id: int):
    row = live(Provider, provider_id)
    if request.method == "POST":
        # A blank key field keeps the stored key: the page never holds it to send back.
        body = form_body(PROVIDER_FORM, clear=("apiVersion", "comment"))
        registry.edit_provider(row, registry.provider_fields(body, required=False))
        flash(_("Provider %(name)s saved.", name=body.get("name", row.name)), "ok")
        return redirect(url_for("dashboard.providers"))
    return render_template("dashboard/provider_form.html", row=row, mask=redact.mask)


@bp.post("/providers/<id:provider_id>/delete")
def delete_provider(provider_id: int):
    row = live(Provider, provider_id)
    registry.remove_provider(row)
    flash(_("Provider %(name)s deleted.", name=row.name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.post("/providers/<id:provider_id>/test")
def test_provider(provider_id: int):
    row = live(Provider, provider_id)
    try:
        found = registry.remote_models(row)
    except UpstreamError as exc:
        flash(_("%(name)s did not answer: %(error)s", name=row.name, error=exc.describe()), "error")
    else:
        names = ", ".join(m["id"] for m in found[:8]) + (" …" if len(found) > 8 else "")
        message = ngettext(
            "%(name)s works: %(num)d model found (%(names)s).",
            "%(name)s works: %(num)d models found (%(names)s).",
            len(found),
            name=row.name,
            names=names,
        )
        flash(message, "ok")
    return redirect(url_for("dashboard.providers"))


@bp.post("/providers/<id:provider_id>/models")
def create_model(provider_id: int):
    body = {**form_body(MODEL_FORM), "providerId": live(Provider, provider_id).id}
    row = registry.add_model(registry.model_fields(body, required=True))
    flash(_("Model %(name)s added.", name=row.system_name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.route("/models/<id:model_id>", methods=["GET", "POST"])
def edit_model(model_id: int):
    row = live(Model, model_id)
    if request.method == "POST":
        clear = ("remoteId", "contextLength", "inputPrice", "outputPrice", "comment")
        clear += ("cacheReadPrice", "cacheWritePrice")
        body = form_body(MODEL_FORM, clear)
        registry.edit_model(row, registry.model_fields(body, required=False))
        flash(_("Model %(name)s saved.", name=body.get("systemName", row.system_name)), "ok")
        return redirect(url_for("dashboard.providers"))
    return render_template("dashboard/model_form.html", row=row)


@bp.post("/models/<id:model_id>/delete")
def delete_model(model_id: int):
    row = live(Model, model_id)
    registry.remove_model(row)
    flash(_("Model %(name)s deleted.", name=row.system_name), "ok")
    return redirect(url_for("dashboard.providers"))


@bp.post("/weights/<path:system_name>")
def weights(system_name: str):
    posted = [
        {"modelId": model_id, "weight": number(value, float)}
        for name, value in request.form.items()
        if (model_id := urlargs.integer(name.removeprefix("weight-"), 1, urlargs.MAX_ID))
    ]
    registry.apply_weights(system_name, posted)
    flash(_("Weights of %(name)s saved.", name=system_name), "ok")
    return redirect(url_for("dashboard.providers") + "#balance")
