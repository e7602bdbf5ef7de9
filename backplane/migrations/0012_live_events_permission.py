"""The ``backplane.view_live_events`` permission: the admin's live view of a tenant's events.

Model options only: no table changes.
"""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("backplane", "0011_token_audit"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="outboxitem",
            options={
                "permissions": [
                    ("view_payload", "Can view outbox payloads"),
                    ("view_live_events", "Can watch events live in the admin (of tenants with operator access)"),
                ]
            },
        ),
    ]
