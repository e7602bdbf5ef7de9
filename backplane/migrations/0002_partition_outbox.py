"""PostgreSQL: make the outbox a time-partitioned table (see backplane/partitions.py).

SQLite keeps the plain table. The model state is unchanged: Django sees the same columns
and index names; only the physical primary key becomes (id, created_at).
"""

from django.db import migrations


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from backplane.partitions import convert_outbox

    convert_outbox(schema_editor)


class Migration(migrations.Migration):
    atomic = True
    dependencies = [("backplane", "0001_initial")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop, elidable=False)]
