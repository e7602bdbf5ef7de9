"""PostgreSQL: ``bp_assign`` writes the offsets with one static UPDATE instead of one dynamic
UPDATE per partition.

0008's function built an UPDATE for each partition with ``EXECUTE format(...)``, which
PostgreSQL parses and plans on every call. The claim now also returns each row's
``created_at`` (the partition key; the primary key is ``(id, created_at)``), so one UPDATE
through the parent finds every row by its primary key; PL/pgSQL keeps its plan — a generic one, forced (see the body). Measured with raw psycopg
on a quiet machine, calls of one row each: 0.67 → 0.51 ms (docs/performance.md). A call that
claims nothing no longer runs the UPDATE at all.

Same arguments, same result columns: CREATE OR REPLACE is safe under running relays (their
prepared ``SELECT * FROM bp_assign(...)`` keeps its result type).
"""

import importlib

from django.db import migrations

ASSIGN_FUNCTION = r"""
CREATE OR REPLACE FUNCTION bp_assign(p_shards int[], p_limit int, p_only uuid, p_skip uuid[])
RETURNS TABLE (r_id bigint, r_part text, r_epoch text, r_kind text, r_stream text, r_shard smallint,
               r_offset bigint, r_event_id text, r_type text, r_occurred_at timestamptz,
               r_payload text, r_tenant_id uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_ids bigint[];
    v_created timestamptz[];
    v_offs bigint[];
    v_epochs text[];
BEGIN
    -- Generic plans, made once per session: with the defaults PostgreSQL plans the UPDATE
    -- afresh on every call when calls carry a row or two (a custom plan for one key looks
    -- cheaper than the generic one for an unknown number), which cost more than it saved.
    -- And the claim's rows meet their streams' heads by a hash join: a generic plan made while
    -- the outbox looked empty joins them by a nested loop, n rows × n heads (22 ms for 500).
    PERFORM set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_nestloop', 'off', true);
    -- Claim the oldest unassigned rows of the shards (locked), bump each stream's head by its
    -- row count (creating it with a fresh epoch), number the rows in id order per stream.
    WITH claimed AS (
        SELECT o.id, o.created_at, o.stream, o.tenant_id FROM backplane_outboxitem o
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
        SELECT c.id, c.created_at, h.epoch,
               h.last_offset - count(*) OVER w + row_number() OVER (w ORDER BY c.id) AS off
        FROM claimed c JOIN heads h ON h.key = c.stream
        WINDOW w AS (PARTITION BY c.stream)
    )
    SELECT array_agg(n.id), array_agg(n.created_at), array_agg(n.off), array_agg(n.epoch::text)
    INTO v_ids, v_created, v_offs, v_epochs FROM numbered n;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- Only the claimed rows are read, through each partition's primary key, whatever the plan:
    -- the redundant ``id = ANY`` is an index condition, so the join below only ever sees those
    -- rows. The plan is kept for the session, and a partition analyzed while empty (a new
    -- one) would otherwise be read whole for every call as it fills; a sequential scan is
    -- never right here. (No ``created_at = ANY`` beside it: checked row by row against the
    -- whole array, it halved the relay's throughput at 500-row batches, and pruned nothing;
    -- ``created_at BETWEEN`` the rows' first and last pruned, and cost as much: 19.8k against
    -- 32-33k rows/s in bench/relay_throughput.py, run in turn.)
    -- Local to this transaction; this statement is planned with it.
    PERFORM set_config('enable_seqscan', 'off', true), set_config('enable_nestloop', 'on', true);
    RETURN QUERY
        UPDATE backplane_outboxitem o SET stream_offset = v.off, assigned_at = now()
        FROM unnest(v_ids, v_created, v_offs, v_epochs) AS v(id, created_at, off, epoch)
        WHERE o.id = ANY(v_ids) AND o.id = v.id AND o.created_at = v.created_at
        RETURNING o.id, o.tableoid::regclass::text, v.epoch, o.kind::text, o.stream::text, o.shard,
                  o.stream_offset, o.event_id::text, o.type::text, o.occurred_at, o.payload::text, o.tenant_id;
END
$fn$
"""


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(ASSIGN_FUNCTION)  # no parameters: nothing to escape


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(importlib.import_module("backplane.migrations.0008_assign_function").ASSIGN_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [("backplane", "0008_assign_function")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
