"""PostgreSQL: ``bp_publish_v1``, one event appended inside the caller's COMMIT message.

publish() in a transaction sends ``SELECT bp_publish_v1(...); COMMIT`` as one query when the
caller commits (``backplane/store/sql/bp_publish_v1.sql``; a released function file never
changes: a change is ``bp_publish_v2.sql`` and a new migration). SQLite has no server-side
functions: nothing to do there.
"""

from pathlib import Path

from django.db import migrations

SOURCE = Path(__file__).resolve().parent.parent / "store" / "sql" / "bp_publish_v1.sql"


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(SOURCE.read_text())  # no parameters: its text keeps its % signs


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute("DROP FUNCTION IF EXISTS bp_publish_v1(uuid, text, text, text, timestamptz, jsonb, int, int)")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0014_stream_updated_index")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
