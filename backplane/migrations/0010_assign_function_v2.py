"""PostgreSQL: ``bp_assign_v2``, the relay's offset assignment, from its own versioned file.

The body is 0009's ``bp_assign`` under a versioned name, its SQL in
``backplane/store/sql/bp_assign_v2.sql`` (read here by that fixed name: a released function file
never changes; a change is a new file, ``bp_assign_v3.sql``, and a new migration). The store
calls ``bp_assign_v2`` from now on.

The old ``bp_assign`` stays: relays still running the previous code during an online upgrade
call it (its result type is unchanged). A later migration drops it once no such relay is left.
SQLite has no server-side functions: nothing to do there.
"""

from pathlib import Path

from django.db import migrations

SOURCE = Path(__file__).resolve().parent.parent / "store" / "sql" / "bp_assign_v2.sql"


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(SOURCE.read_text())  # no parameters: its text keeps its % signs


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute("DROP FUNCTION IF EXISTS bp_assign_v2(int[], int, uuid, uuid[])")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0009_assign_static_update")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
