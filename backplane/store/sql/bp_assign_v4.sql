-- bp_assign_v4: the relay's offset assignment on PostgreSQL (migration 0019 creates it).
--
-- Parameters:
--   p_shards  int[]     the shards the calling relay leases; only their rows are claimed
--   p_limit   int       claim at most this many rows, the oldest (lowest id) first
--   p_only    uuid      NULL, or the one tenant whose rows to claim (the relay's per-tenant retry)
--   p_skip    uuid[]    NULL or tenants whose rows to leave (quarantined by the relay)
--   p_after   bigint    NULL, or the relay's claim floor: every row of these shards with an id at
--                       or below it is known to have its offset (backplane.claims.ClaimFloor), so
--                       the claim's index scan starts above it
-- Returns the rows just assigned, ready to send: the columns of backplane.store.rows
-- PENDING_COLUMNS, each prefixed r_ (as bp_assign_v3).
--
-- bp_assign_v3 with p_after. An assigned row leaves the claim's partial index
-- (bp_outbox_unassigned_id, stream_offset IS NULL) only when a VACUUM removes its entry; until
-- then every claim from the lowest id walks past the entries of every row assigned since the
-- last vacuum: 0.5 - 1.2 ms per call after 300 000 rows, and a partition vacuums after a fifth
-- of its rows are dead (docs/decisions/0048-the-claim-walks-the-dead-rows-since-the-last-vacuum.md).
-- With a floor the scan starts past them. `o.id > coalesce(p_after, 0)` (ids start at 1) is an
-- index condition in the generic plan, where `p_after IS NULL OR ...` would not be.
--
-- bp_assign_v3's claim, numbering and offsets as one statement on the wire: called in
-- autocommit, the call is its own transaction, and it sets synchronous_commit on for it (the
-- relay's session runs with it off), so the offsets are durable before the rows come back.
-- Why and what was measured: docs/decisions/0035-assignment-one-statement-send-overlapped.md.
--
-- Released: never edit this file. A change is bp_assign_v5.sql with a migration that creates
-- it (CREATE OR REPLACE under running relays fails their prepared calls when the result type
-- changes; PL/pgSQL checks a body only when it runs).
CREATE OR REPLACE FUNCTION bp_assign_v4(p_shards int[], p_limit int, p_only uuid, p_skip uuid[], p_after bigint)
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
    -- This transaction's commit waits for the WAL flush: offsets must be durable before they
    -- are sent (docs/decisions/0012-relay-session-settings.md). Generic plans, made once per
    -- session; no nested loops (the claim's rows meet their heads by a hash join, the offsets'
    -- UPDATE its rows too) and no sequential scans (a plan kept from a partition analyzed
    -- while empty would read it whole per call as it fills): docs/decisions/0011 and 0035.
    PERFORM set_config('synchronous_commit', 'on', true), set_config('plan_cache_mode', 'force_generic_plan', true),
            set_config('enable_nestloop', 'off', true), set_config('enable_seqscan', 'off', true);
    WITH claimed AS (
        SELECT o.id, o.created_at, o.stream, o.tenant_id FROM backplane_outboxitem o
        WHERE o.shard = ANY(p_shards) AND o.stream_offset IS NULL AND o.id > coalesce(p_after, 0)
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
    -- Only the claimed rows are read, through each partition's primary key: the redundant
    -- id = ANY is the index condition (docs/decisions/0011).
    RETURN QUERY
        UPDATE backplane_outboxitem o SET stream_offset = v.off, assigned_at = now()
        FROM unnest(v_ids, v_created, v_offs, v_epochs) AS v(id, created_at, off, epoch)
        WHERE o.id = ANY(v_ids) AND o.id = v.id AND o.created_at = v.created_at
        RETURNING o.id, o.tableoid::regclass::text, v.epoch, o.kind::text, o.stream::text, o.shard,
                  o.stream_offset, o.event_id::text, o.type::text, o.occurred_at, o.payload::text, o.tenant_id;
END
$fn$;
