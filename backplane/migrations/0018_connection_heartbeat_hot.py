"""The heartbeat's refresh of its sockets' rows as HOT updates
(docs/decisions/0045-heartbeat-rows-hot.md).

Every heartbeat (5 s) sets ``expires_at`` and ``last_seen_at`` of each of its edge's rows; with
``expires_at`` indexed every refresh was a new entry in each of the table's eight indexes and
a dead row only VACUUM removes — 20 000 rows' worth every 5 s on an edge of 20 000 peers.
Without ``bp_conn_expires`` neither column is indexed, so PostgreSQL updates the rows in
place on their pages (HOT); the table gets a fillfactor so each page has room for the new
versions. Readers find live rows through the tenant, token, device or edge indexes and filter
``expires_at`` on those; the heartbeat's sweep finds quiet edges by their own row
(``directory.sweep``); only compaction's sweep scans the table for expired rows.
"""

from django.db import migrations

# Room on every page for new versions of its rows (a HOT update needs it on the same page).
FILLFACTOR = 50


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE backplane_connection SET (fillfactor = {FILLFACTOR})")


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE backplane_connection RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0017_stream_moved_bucket")]

    operations = [
        migrations.RemoveIndex(model_name="connection", name="bp_conn_expires"),
        migrations.RunPython(forwards, backwards, elidable=False),
    ]
