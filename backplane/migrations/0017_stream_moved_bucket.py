"""The head check's change feed by a 10-second bucket of ``updated_at``, so that the relay's
head bumps are HOT updates again (docs/decisions/0036-hot-stream-heads.md).

``bp_stream_updated`` (0014) made every bump change an indexed column: a new entry in every
index of ``backplane_stream`` and a dead row only VACUUM removes. ``moved_bucket`` is a stored
generated column (written by the database, so relays still calling ``bp_assign_v2``/``v3``
keep it right) whose value changes once per stream per bucket; PostgreSQL compares the old and
new values, so the other bumps are HOT. On PostgreSQL the table also gets a fillfactor: room on
each page for the new row versions of a HOT update (applied by the rewrite that adding the
stored column makes). SQLite: the same column and index; no fillfactor.
"""

import backplane.models
from django.db import migrations, models

# Room on every page for new versions of its rows (a HOT update needs it on the same page).
FILLFACTOR = 80


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE backplane_stream SET (fillfactor = {FILLFACTOR})")


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE backplane_stream RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0016_assign_function_v3")]

    operations = [
        migrations.RemoveIndex(model_name="stream", name="bp_stream_updated"),
        # Before the column: the rewrite that adding it makes fills pages to the new factor.
        migrations.RunPython(forwards, backwards, elidable=False),
        migrations.AddField(
            model_name="stream",
            name="moved_bucket",
            field=models.GeneratedField(
                db_persist=True,
                expression=backplane.models.MovedBucket("updated_at"),
                output_field=models.BigIntegerField(),
            ),
        ),
        migrations.AddIndex(
            model_name="stream",
            index=models.Index(fields=["moved_bucket"], name="bp_stream_moved"),
        ),
    ]
