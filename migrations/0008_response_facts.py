"""What the provider answered, kept on the record: the model that answered and why it stopped.

``completions.response_model`` is the model the provider names in its answer (it may
differ from the one asked for: an alias resolved, a dated version), and
``completions.stop_reason`` the answer's stop reason in the gateway's terms
(``end_turn``, ``max_tokens``, ``tool_use``, ``stop_sequence``, ...). The OpenTelemetry
span of a record reports both (``gen_ai.response.model``,
``gen_ai.response.finish_reasons``), so span and row agree. Nullable: older rows and
calls that got no answer have neither.
"""

from peewee import CharField


def up(migrator, db):
    migrator.migrate(
        migrator.add_column("completions", "response_model", CharField(max_length=255, null=True)),
        migrator.add_column("completions", "stop_reason", CharField(max_length=31, null=True)),
    )
