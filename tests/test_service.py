"""The public API's answers that are not calls: /v1/models."""

from __future__ import annotations

from datetime import datetime

from gateway.models import Model, Provider


def test_models_are_listed_once_a_name_with_their_creation_time(client, db) -> None:  # type: ignore[no-untyped-def]
    a = Provider.create(name="a", type="openai", base_url="https://a.example/v1")
    b = Provider.create(name="b", type="openai", base_url="https://b.example/v1")
    made = datetime(2024, 5, 1, 12, 0, 0)  # naive UTC, as every row's clock
    Model.create(provider=b, system_name="gpt", created_at=made)
    Model.create(provider=a, system_name="gpt", created_at=datetime(2025, 1, 1))
    Model.create(provider=a, system_name="embed", model_type="embedding", created_at=made)
    Model.create(provider=a, system_name="gone", deleted=True)

    listed = client.get("/v1/models").get_json()
    assert listed == {
        "object": "list",
        "data": [
            # The first row of a name (by id) answers for it, its time and its provider.
            {"id": "gpt", "object": "model", "created": 1714564800, "owned_by": "b"},
            {"id": "embed", "object": "model", "created": 1714564800, "owned_by": "a"},
        ],
    }
    assert client.get("/v1/models/").get_json() == listed  # NexusGate's server takes it too
