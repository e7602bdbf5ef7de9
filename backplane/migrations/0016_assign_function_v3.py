"""PostgreSQL: ``bp_assign_v3``, the relay's assignment as one statement on the wire.

Its SQL is ``backplane/store/sql/bp_assign_v3.sql`` (read here by that fixed name: a released
function file never changes). It sets ``synchronous_commit`` on for its own transaction, so the
relay calls it alone, in autocommit, without BEGIN, SET LOCAL and COMMIT around it
(docs/decisions/0035-assignment-one-statement-send-overlapped.md). The store calls
``bp_assign_v3`` from now on.

``bp_assign_v2`` (and ``bp_assign``) stay: relays still running the previous code during an
online upgrade call them. A later migration drops them once no such relay is left. SQLite has
no server-side functions: nothing to do there.
"""

from pathlib import Path

from django.db import migrations

SOURCE = Path(__file__).resolve().parent.parent / "store" / "sql" / "bp_assign_v3.sql"


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(SOURCE.read_text())  # no parameters: its text keeps its % signs


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute("DROP FUNCTION IF EXISTS bp_assign_v3(int[], int, uuid, uuid[])")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0015_publish_function")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
