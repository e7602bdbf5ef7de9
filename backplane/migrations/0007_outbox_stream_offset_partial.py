"""The outbox's ``(stream, stream_offset)`` index becomes partial (``WHERE stream_offset IS NOT
NULL``): a row enters it when the relay gives it its offset, not also when it is published.

On PostgreSQL the new index is built without blocking publishers: a parent index made ``ON
ONLY`` the outbox, then each partition's index built with ``CREATE INDEX CONCURRENTLY`` and
attached to it (a plain ``CREATE INDEX`` on the partitioned table would hold a SHARE lock on
every partition — no inserts — for the whole build); then the old index is dropped (a short
exclusive lock, nothing rebuilt) and the new one takes its name. Interrupted, it can run
again: it starts by removing what an earlier attempt left. Elsewhere, Django's operations.
"""

from django.db import migrations, models

TABLE = "backplane_outboxitem"
NAME = "bp_outbox_stream_offset"
BUILDING = "bp_outbox_stream_offset_new"

OLD = models.Index(fields=["stream", "stream_offset"], name=NAME)
NEW = models.Index(
    fields=["stream", "stream_offset"], name=NAME, condition=models.Q(stream_offset__isnull=False)
)


def _partitions_without_child(cur) -> list[str]:  # type: ignore[no-untyped-def]
    cur.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass AND NOT EXISTS ("
        "  SELECT 1 FROM pg_inherits ii JOIN pg_index x ON x.indexrelid = ii.inhrelid "
        "  WHERE ii.inhparent = %s::regclass AND x.indrelid = c.oid) ORDER BY 1",
        [TABLE, BUILDING],
    )
    return [name for (name,) in cur.fetchall()]


def _free_name(cur, base: str) -> str:  # type: ignore[no-untyped-def]
    """``base`` or ``base_N``: the first name no index attached to a parent holds (one that is
    attached to nothing is what an interrupted attempt left: dropped)."""
    for n in range(10):
        name = base if n == 0 else f"{base[:60]}_{n}"
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = c.oid) FROM pg_class c WHERE c.relname = %s",
            [name],
        )
        row = cur.fetchone()
        if row is None:
            return name
        if not row[0]:
            cur.execute(f'DROP INDEX "{name}"')
            return name
    raise RuntimeError(f"no free index name like {base}")


def rebuild(schema_editor, condition: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
    """Replace the index on PostgreSQL with one on the same columns and ``condition``; its
    partitions' indexes are named ``<partition><suffix>``."""
    columns = f"(stream, stream_offset){condition}"
    with schema_editor.connection.cursor() as cur:
        cur.execute("SELECT relkind FROM pg_class WHERE relname = %s", [TABLE])
        if cur.fetchone()[0] != "p":  # not partitioned
            cur.execute(f"DROP INDEX IF EXISTS {BUILDING}")
            cur.execute(f"CREATE INDEX CONCURRENTLY {BUILDING} ON {TABLE} {columns}")
        else:
            cur.execute(f"DROP INDEX IF EXISTS {BUILDING}")  # and its children: an earlier attempt's
            cur.execute(f"CREATE INDEX {BUILDING} ON ONLY {TABLE} {columns}")
            for _ in range(3):  # a partition made meanwhile gets its child index by itself
                parts = _partitions_without_child(cur)
                if not parts:
                    break
                for part in parts:
                    child = _free_name(cur, f"{part[: 63 - len(suffix)]}{suffix}")
                    cur.execute(f'CREATE INDEX CONCURRENTLY "{child}" ON "{part}" {columns}')
                    cur.execute(f'ALTER INDEX {BUILDING} ATTACH PARTITION "{child}"')
            cur.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", [BUILDING])
            if not cur.fetchone()[0]:
                raise RuntimeError(f"{BUILDING} is not valid: a partition has no index attached; run migrate again")
        cur.execute(f"DROP INDEX IF EXISTS {NAME}")
        cur.execute(f"ALTER INDEX {BUILDING} RENAME TO {NAME}")


def _replace(apps, schema_editor, old, new, condition: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        rebuild(schema_editor, condition, suffix)
        return
    model = apps.get_model("backplane", "OutboxItem")
    schema_editor.remove_index(model, old)
    schema_editor.add_index(model, new)


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    _replace(apps, schema_editor, OLD, NEW, " WHERE stream_offset IS NOT NULL", "_stream_offset_p")


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    _replace(apps, schema_editor, NEW, OLD, "", "_stream_offset")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("backplane", "0006_created_at_brin"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveIndex(model_name="outboxitem", name=NAME),
                migrations.AddIndex(model_name="outboxitem", index=NEW),
            ],
            database_operations=[migrations.RunPython(forwards, backwards, elidable=False)],
        ),
    ]
