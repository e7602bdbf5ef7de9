-- Named statements of backplane.store.sqlite.SQLiteStore (loaded by backplane.store.queries).
-- Lists travel as one JSON text each, unpacked with json_each: one statement text whatever
-- their length. Tenant ids are stored as 32 hex digits. Rows come back in the column orders of
-- backplane.store.rows (PENDING_COLUMNS, HEAD_COLUMNS, ITEM_COLUMNS).

-- name: tenant_state
-- Parameters: tenant.
SELECT is_active FROM backplane_tenant WHERE id = %s

-- name: insert_keys
-- The event keys that went in are returned (the others were published before).
-- Parameters: tenant, event ids (JSON).
INSERT INTO backplane_eventkey (tenant_id, event_id, created_at)
SELECT %s, j.value, CURRENT_TIMESTAMP FROM json_each(%s) AS j WHERE true
ON CONFLICT DO NOTHING RETURNING event_id

-- name: claim
-- The oldest rows of the shards without an offset. Parameters: shards (JSON), only tenant
-- (or NULL) twice, tenants to skip (JSON), limit.
SELECT id, stream, tenant_id FROM backplane_outboxitem
WHERE shard IN (SELECT value FROM json_each(%s)) AND stream_offset IS NULL
  AND (%s IS NULL OR tenant_id = %s) AND tenant_id NOT IN (SELECT value FROM json_each(%s))
ORDER BY id LIMIT %s

-- name: bump_heads
-- Each stream's head goes up by its row count (a new stream starts with the epoch given).
-- Parameters: [[key, tenant, audience, epoch, rows], ...] (JSON).
INSERT INTO backplane_stream (key, tenant_id, audience, epoch, last_offset, first_retained_offset, updated_at)
SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
       json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), 1, CURRENT_TIMESTAMP
FROM json_each(%s) AS j WHERE true
ON CONFLICT (key) DO UPDATE SET last_offset = backplane_stream.last_offset + excluded.last_offset,
                                updated_at = excluded.updated_at
RETURNING key, last_offset, epoch

-- name: set_offset
-- Parameters: offset, assigned at, row id.
UPDATE backplane_outboxitem SET stream_offset = %s, assigned_at = %s WHERE id = %s

-- name: assigned
-- The rows just given offsets. Parameters: row ids (JSON).
SELECT o.id, NULL AS part, s.epoch, o.kind, o.stream, o.shard, o.stream_offset AS "offset", o.event_id, o.type,
       o.occurred_at, o.payload, o.tenant_id
FROM backplane_outboxitem o JOIN backplane_stream s ON s.key = o.stream
WHERE o.id IN (SELECT value FROM json_each(%s))

-- name: mark_forwarded
-- Parameters: forwarded at, row ids (JSON).
UPDATE backplane_outboxitem SET forwarded_at = %s WHERE id IN (SELECT value FROM json_each(%s))

-- name: unforwarded
-- Parameters: shards (JSON), tenants to skip (JSON), limit.
SELECT o.id, NULL AS part, s.epoch, o.kind, o.stream, o.shard, o.stream_offset AS "offset", o.event_id, o.type,
       o.occurred_at, o.payload, o.tenant_id
FROM backplane_outboxitem o JOIN backplane_stream s ON s.key = o.stream
WHERE o.shard IN (SELECT value FROM json_each(%s)) AND o.forwarded_at IS NULL AND o.stream_offset IS NOT NULL
  AND o.tenant_id NOT IN (SELECT value FROM json_each(%s))
ORDER BY o.stream, o.stream_offset LIMIT %s

-- name: pending_tenants
-- Parameters: shards (JSON).
SELECT DISTINCT tenant_id FROM backplane_outboxitem
WHERE shard IN (SELECT value FROM json_each(%s)) AND forwarded_at IS NULL

-- name: ensure_streams
-- Parameters: [[key, tenant, audience, epoch], ...] (JSON).
INSERT INTO backplane_stream (key, tenant_id, audience, epoch, last_offset, first_retained_offset, updated_at)
SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
       json_extract(j.value, '$[3]'), 0, 1, CURRENT_TIMESTAMP
FROM json_each(%s) AS j WHERE true
ON CONFLICT (key) DO NOTHING

-- name: stream_heads
-- Parameters: keys (JSON).
SELECT key, epoch, last_offset, first_retained_offset FROM backplane_stream
WHERE key IN (SELECT value FROM json_each(%s))

-- name: heads_moved_since
-- The edges' head check: the clock now (UTC text, as updated_at is stored), and the heads of the
-- streams whose head moved after the time given (none when it is NULL); one row with a NULL key
-- when none moved. updated_at has whole seconds (CURRENT_TIMESTAMP): the caller's margin covers
-- them. By bp_stream_moved: the bucket is backplane.models.MovedBucket's expression (the
-- generated column's), monotonic in the time (docs/decisions/0036-hot-stream-heads.md).
-- Parameters: since (text or NULL).
SELECT strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now'), s.key, s.epoch, s.last_offset, s.first_retained_offset
FROM (SELECT %s AS since) n LEFT JOIN backplane_stream s
  ON s.moved_bucket >= (CAST((julianday(n.since) - 2440587.5) * 86400 AS INTEGER) / 10) AND s.updated_at > n.since

-- name: read_range
-- Parameters: stream, after, up to (inclusive).
SELECT stream_offset, event_id, type, occurred_at, payload FROM backplane_outboxitem
WHERE stream = %s AND stream_offset > %s AND stream_offset <= %s ORDER BY stream_offset

-- name: expire_keys
-- One batch of idempotency keys older than the window. Parameters: window (seconds), batch.
DELETE FROM backplane_eventkey WHERE rowid IN (
    SELECT rowid FROM backplane_eventkey
    WHERE created_at < strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || %s || ' seconds') LIMIT %s)
