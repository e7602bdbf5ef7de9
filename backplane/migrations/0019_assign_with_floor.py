"""PostgreSQL: ``bp_assign_v4``, the relay's assignment with a claim floor.

Its SQL is ``backplane/store/sql/bp_assign_v4.sql`` (read here by that fixed name: a released
function file never changes). It is ``bp_assign_v3`` with ``p_after``: the claim's index scan
starts above the relay's claim floor, past the index entries of the rows assigned since the
last vacuum (docs/decisions/0048-the-claim-walks-the-dead-rows-since-the-last-vacuum.md). The
store calls ``bp_assign_v4`` from now on.

``bp_assign_v3`` (and the older ones) stay: relays still running the previous code during an
online upgrade call them. SQLite has no server-side functions: nothing to do there.
"""

from pathlib import Path

from django.db import migrations

SOURCE = Path(__file__).resolve().parent.parent / "store" / "sql" / "bp_assign_v4.sql"


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(SOURCE.read_text())  # no parameters: its text keeps its % signs


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute("DROP FUNCTION IF EXISTS bp_assign_v4(int[], int, uuid, uuid[], bigint)")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0018_connection_heartbeat_hot")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
