"""PostgreSQL: the relay's offset assignment as one server-side function, ``bp_assign``.

The relay called two statements in two round trips (claim and number the rows; then give
each partition's rows their offsets by primary key). As a function it is one call: the relay's
assignment transaction (BEGIN, the call, COMMIT) goes out and comes back in one round trip.
SQLite has no such functions and keeps the statements (backplane/outbox.py).

Semantics are the statements' own: claim the oldest unassigned rows of the shards (locked),
bump each stream's head by its row count (creating it with a fresh epoch), number the rows in
id order within each stream, write the offsets partition by partition by primary key, and
return the assigned rows.

Changing it later: PL/pgSQL checks the body only when it runs, so a change to the tables it
reads must come with a new version of the function; and a change to its result columns needs
a new name (``bp_assign_v2``), not CREATE OR REPLACE: running relays hold the call prepared,
and a prepared ``SELECT *`` whose result type changed fails ("cached plan must not change
result type").
"""

from django.db import migrations

ASSIGN_FUNCTION = r"""
CREATE OR REPLACE FUNCTION bp_assign(p_shards int[], p_limit int, p_only uuid, p_skip uuid[])
RETURNS TABLE (r_id bigint, r_part text, r_epoch text, r_kind text, r_stream text, r_shard smallint,
               r_offset bigint, r_event_id text, r_type text, r_occurred_at timestamptz,
               r_payload text, r_tenant_id uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    batch record;
BEGIN
    FOR batch IN
        WITH claimed AS (
            SELECT o.id, o.stream, o.tenant_id, o.tableoid FROM backplane_outboxitem o
            WHERE o.shard = ANY(p_shards) AND o.stream_offset IS NULL
              AND (p_only IS NULL OR o.tenant_id = p_only)
              AND (p_skip IS NULL OR NOT (o.tenant_id = ANY(p_skip)))
            ORDER BY o.id LIMIT p_limit FOR UPDATE
        ), counts AS (
            SELECT c.stream, (array_agg(c.tenant_id))[1] AS tenant_id, count(*) AS n FROM claimed c GROUP BY c.stream
        ), heads AS (
            INSERT INTO backplane_stream AS s (key, tenant_id, audience, epoch, last_offset,
                                              first_retained_offset, updated_at)
            SELECT k.stream, k.tenant_id,
                   CASE left(k.stream, 1) WHEN 't' THEN 'tenant' WHEN 'r' THEN 'role'
                                          WHEN 'd' THEN 'device' ELSE 'edge' END,
                   substr(md5(random()::text || clock_timestamp()::text), 1, 8), k.n, 1, now()
            FROM counts k ORDER BY k.stream
            ON CONFLICT (key) DO UPDATE SET last_offset = s.last_offset + excluded.last_offset,
                                            updated_at = excluded.updated_at
            RETURNING s.key, s.last_offset, s.epoch
        ), numbered AS (
            SELECT c.id, c.tableoid, h.epoch,
                   h.last_offset - count(*) OVER w + row_number() OVER (w ORDER BY c.id) AS off
            FROM claimed c JOIN heads h ON h.key = c.stream
            WINDOW w AS (PARTITION BY c.stream)
        )
        SELECT n.tableoid::regclass::text AS part, array_agg(n.id) AS ids, array_agg(n.off) AS offs,
               array_agg(n.epoch::text) AS epochs
        FROM numbered n GROUP BY n.tableoid
    LOOP
        -- By primary key, partition by partition: a hash or merge join would read the whole
        -- partition (the planner picks one for a few hundred keys). Local to this transaction.
        PERFORM set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true);
        RETURN QUERY EXECUTE format(
            'UPDATE %s o SET stream_offset = v.off, assigned_at = now() '
            'FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS v(id, off, epoch) WHERE o.id = v.id '
            'RETURNING o.id, %L::text, v.epoch, o.kind::text, o.stream::text, o.shard, o.stream_offset, '
            'o.event_id::text, o.type::text, o.occurred_at, o.payload::text, o.tenant_id',
            batch.part, batch.part)
        USING batch.ids, batch.offs, batch.epochs;
    END LOOP;
END
$fn$
"""


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(ASSIGN_FUNCTION)  # no parameters: its format() strings keep their %


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS bp_assign(int[], int, uuid, uuid[])")


class Migration(migrations.Migration):
    dependencies = [("backplane", "0007_outbox_stream_offset_partial")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
