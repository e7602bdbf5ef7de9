"""PostgreSQL: make the outbox a time-partitioned table (see backplane/partitions.py).

SQLite keeps the plain table. The model state is unchanged: Django sees the same columns
and index names; only the physical primary key becomes (id, created_at).

Self-contained on purpose: this is history, frozen as it ran — it imports no app code, so
editing ``backplane.partitions`` cannot change what migrating from zero builds. Partitions
ahead are named as ``backplane.partitions`` names them (``<table>_pYYYYmmdd_HHMMSS``), so the
relays' own ``ensure_ahead`` finds them.
"""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import migrations

TABLE = "backplane_outboxitem"
DEFAULT_PARTITION = f"{TABLE}_default"
# The defaults of BACKPLANE["PARTITION_INTERVAL_SECS"] and ["PARTITIONS_AHEAD"] when this ran.
INTERVAL_SECS = 6 * 3600
AHEAD = 2


def _partitioned(cur) -> bool:  # type: ignore[no-untyped-def]
    cur.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s)", [TABLE])
    return cur.fetchone() is not None


def _create_ahead(cur) -> None:  # type: ignore[no-untyped-def]
    """The partitions from the current interval to AHEAD intervals ahead."""
    configured = getattr(settings, "BACKPLANE", {}) or {}
    interval = int(configured.get("PARTITION_INTERVAL_SECS", INTERVAL_SECS))
    ahead = int(configured.get("PARTITIONS_AHEAD", AHEAD))
    cur.execute("SELECT now()")
    now = cur.fetchone()[0].astimezone(UTC)
    first = int(now.timestamp()) // interval * interval
    for k in range(ahead + 1):
        start = datetime.fromtimestamp(first + k * interval, UTC)
        name = f"{TABLE}_p{start:%Y%m%d_%H%M%S}"
        cur.execute(
            f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)',
            [start, start + timedelta(seconds=interval)],
        )


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Existing rows are copied; partitions are made from now on (older rows go to DEFAULT)."""
    if schema_editor.connection.vendor != "postgresql":
        return
    old = f"{TABLE}_unpartitioned"
    with schema_editor.connection.cursor() as cur:
        if _partitioned(cur):
            return
        cur.execute(f"ALTER TABLE {TABLE} RENAME TO {old}")
        cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexname LIKE 'bp_outbox_%%'", [old])
        for (index,) in cur.fetchall():
            cur.execute(f'DROP INDEX "{index}"')
        cur.execute(
            f"CREATE TABLE {TABLE} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY) PARTITION BY RANGE (created_at)"
        )
        cur.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey_p PRIMARY KEY (id, created_at)")
        cur.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT")
        cur.execute(f"CREATE INDEX bp_outbox_unassigned ON {TABLE} (shard, id) WHERE stream_offset IS NULL")
        # (Migration 0005 replaces this index with bp_outbox_unassigned_id on (id, shard).)
        cur.execute(
            f"CREATE INDEX bp_outbox_unforwarded ON {TABLE} (shard, stream, stream_offset) "
            f"WHERE forwarded_at IS NULL AND stream_offset IS NOT NULL"
        )
        cur.execute(f"CREATE INDEX bp_outbox_stream_offset ON {TABLE} (stream, stream_offset)")
        cur.execute(f"CREATE INDEX bp_outbox_created ON {TABLE} (created_at)")
        _create_ahead(cur)
        cur.execute(f"INSERT INTO {TABLE} SELECT * FROM {old}")
        cur.execute(
            f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), "
            f"coalesce((SELECT max(id) FROM {TABLE}), 0) + 1, false)"
        )
        cur.execute(f"DROP TABLE {old}")


class Migration(migrations.Migration):
    atomic = True
    dependencies = [("backplane", "0001_initial")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop, elidable=False)]
