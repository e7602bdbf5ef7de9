-- Named statements of backplane.store.postgresql.PostgreSQLStore (loaded by backplane.store.queries).
-- Rows come back in the column orders of backplane.store.rows (PENDING_COLUMNS, HEAD_COLUMNS,
-- ITEM_COLUMNS); tests/integration/test_migrations.py prepares every statement here against a
-- database migrated from zero and checks those columns.

-- name: publish_one
-- publish(): scalar parameters, a plan without JSON unpacking. Checks the tenant (unknown:
-- NULL; inactive: false), inserts the event key with ON CONFLICT DO NOTHING and, only if the
-- key went in, the outbox row; one statement is atomic.
-- Parameters: tenant, tenant, event_id, tenant, stream, type, occurred_at, payload, payload_bytes, shard.
WITH t AS (SELECT is_active FROM backplane_tenant WHERE id = %s),
k AS (INSERT INTO backplane_eventkey (tenant_id, event_id) SELECT %s, %s
      WHERE coalesce((SELECT is_active FROM t), false) ON CONFLICT DO NOTHING RETURNING event_id),
o AS (INSERT INTO backplane_outboxitem (tenant_id, kind, stream, event_id, type, occurred_at, payload,
      payload_bytes, shard) SELECT %s, 'event', %s, k.event_id, %s, %s, %s::jsonb, %s, %s FROM k RETURNING 1)
SELECT (SELECT is_active FROM t), (SELECT count(*) FROM o)

-- name: publish_many
-- publish_many(): the rows come as two JSON texts (their fields; their payloads, already JSON)
-- parsed once each as jsonb (json's ->> would re-read a row's text for every field), inserted
-- in the order given. Parameters: tenant, fields JSON, payloads JSON, tenant, tenant, shard.
WITH t AS (SELECT is_active FROM backplane_tenant WHERE id = %s),
v AS (SELECT a.i, a.m->>0 AS stream, a.m->>1 AS event_id, a.m->>2 AS type,
      (a.m->>3)::timestamptz AS occurred_at, (a.m->>4)::int AS payload_bytes, b.p AS payload
      FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS a(m, i)
      JOIN jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS b(p, i) USING (i)),
k AS (INSERT INTO backplane_eventkey (tenant_id, event_id) SELECT %s, v.event_id FROM v
      WHERE coalesce((SELECT is_active FROM t), false) ON CONFLICT DO NOTHING RETURNING event_id),
o AS (INSERT INTO backplane_outboxitem (tenant_id, kind, stream, event_id, type, occurred_at, payload,
      payload_bytes, shard) SELECT %s, 'event', v.stream, v.event_id, v.type, v.occurred_at,
      v.payload, v.payload_bytes, %s FROM v JOIN k USING (event_id) ORDER BY v.i RETURNING 1)
SELECT (SELECT is_active FROM t), (SELECT count(*) FROM o)

-- name: assign
-- The relay's assignment (backplane/store/sql/bp_assign_v4.sql; its own durable transaction when
-- called in autocommit). Parameters: shards, limit, only tenant (or NULL), tenants to skip,
-- the claim floor (or NULL: from the lowest id).
SELECT r_id, r_part, r_epoch, r_kind, r_stream, r_shard, r_offset, r_event_id, r_type, r_occurred_at,
       r_payload, r_tenant_id
FROM bp_assign_v4(%s::int[], %s::int, %s::uuid, %s::uuid[], %s::bigint)

-- name: claim_horizon
-- Before the assignment, in its transaction (backplane.claims.ClaimFloor): the oldest
-- transaction still running (the statement's snapshot's xmin) and the last outbox id handed out
-- (NULL before the first, and when the sequence caches ids per backend: then a backend may
-- still hand out ids below it). Read before the claim gives the call a transaction id.
-- Parameters: the id sequence's oid as the last call returned it, or NULL: looked up by the
-- table's name then (pg_get_serial_sequence reads pg_depend: ~30 µs a call).
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint,
       CASE WHEN s.seqcache = 1 THEN pg_sequence_last_value(s.seqrelid) END, s.seqrelid::bigint
FROM pg_sequence s
WHERE s.seqrelid = coalesce(%s::oid, pg_get_serial_sequence('backplane_outboxitem', 'id')::regclass)

-- name: claim_xid
-- After the assignment, in its transaction: its transaction id, NULL when it claimed nothing
-- (no row lock, so none was given).
SELECT pg_current_xact_id_if_assigned()::text::bigint

-- name: mark_forwarded
-- By primary key in one partition ({part}; the parent table when it is not known).
-- Parameters: row ids.
UPDATE {part} SET forwarded_at = now() WHERE id = ANY(%s::bigint[])

-- name: unforwarded
-- Assigned rows no relay has recorded as forwarded, by stream and offset (the resend set).
-- Parameters: shards, tenants to skip, limit.
SELECT o.id, o.tableoid::regclass::text AS part, s.epoch, o.kind, o.stream, o.shard, o.stream_offset AS "offset",
       o.event_id, o.type, o.occurred_at, o.payload::text AS payload, o.tenant_id
FROM backplane_outboxitem o JOIN backplane_stream s ON s.key = o.stream
WHERE o.shard = ANY(%s::int[]) AND o.forwarded_at IS NULL AND o.stream_offset IS NOT NULL
  AND NOT (o.tenant_id = ANY(%s::uuid[]))
ORDER BY o.stream, o.stream_offset LIMIT %s

-- name: pending_tenants
-- Parameters: shards.
SELECT DISTINCT tenant_id FROM backplane_outboxitem WHERE shard = ANY(%s::int[]) AND forwarded_at IS NULL

-- name: ensure_streams
-- Streams never seen start at offset 0 with the epoch given (the streams of every socket of a
-- handshake batch, of any tenants). Parameters: keys, tenants, audiences, epochs.
INSERT INTO backplane_stream (key, tenant_id, audience, epoch, last_offset, first_retained_offset, updated_at)
SELECT v.key, v.tenant, v.audience, v.epoch, 0, 1, now()
FROM unnest(%s::text[], %s::uuid[], %s::text[], %s::text[]) AS v(key, tenant, audience, epoch)
ON CONFLICT (key) DO NOTHING

-- name: stream_heads
-- The keys as one JSON text, not a thousand client-side placeholders: an edge asks for all its
-- streams' heads twice a second (docs/decisions/0021-head-check.md).
-- Parameters: keys (JSON array text).
SELECT key, epoch, last_offset, first_retained_offset FROM backplane_stream
WHERE key IN (SELECT jsonb_array_elements_text(%s::jsonb))

-- name: heads_moved_since
-- The edges' head check: the clock now, and the heads of the streams whose head moved after the
-- time given (none when it is NULL); one row with a NULL key when none moved
-- (docs/decisions/0027-head-check-change-feed.md). By bp_stream_moved: the bucket is
-- backplane.models.MovedBucket's expression (the generated column's), monotonic, so every row
-- with updated_at > since has moved_bucket >= since's bucket (docs/decisions/0036-hot-stream-heads.md).
-- Parameters: since (or NULL).
SELECT n.now, s.key, s.epoch, s.last_offset, s.first_retained_offset
FROM (SELECT statement_timestamp() AS now, %s::timestamptz AS since) n LEFT JOIN backplane_stream s
  ON s.moved_bucket >= (floor(extract(epoch from (n.since - timestamptz '1970-01-01 00:00:00+00')) / 10))::bigint
 AND s.updated_at > n.since

-- name: read_range
-- Parameters: stream, after, up to (inclusive).
SELECT stream_offset, event_id, type, occurred_at, payload::text AS payload FROM backplane_outboxitem
WHERE stream = %s AND stream_offset > %s AND stream_offset <= %s ORDER BY stream_offset

-- name: take_shards
-- Advisory locks on the lease session. Parameters: lock class, shards.
SELECT s, pg_try_advisory_lock(%s, s) FROM unnest(%s::int[]) AS s

-- name: expire_keys
-- One batch of idempotency keys older than the window. Parameters: window (seconds), batch.
DELETE FROM backplane_eventkey WHERE (tenant_id, event_id) IN (
    SELECT tenant_id, event_id FROM backplane_eventkey
    WHERE created_at < now() - make_interval(secs => %s) LIMIT %s)

-- name: summarize_brin
-- Summarise the pages added since the last run into the created_at BRIN indexes of the event
-- keys and of every outbox partition. No parameters.
SELECT count(brin_summarize_new_values(i.indexrelid)) FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
WHERE a.amname = 'brin' AND c.relkind = 'i'
  AND (i.indrelid = 'backplane_eventkey'::regclass OR i.indrelid IN
       (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'backplane_outboxitem'::regclass))
