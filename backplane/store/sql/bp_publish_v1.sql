-- bp_publish_v1: one event appended with the COMMIT's own message (migration 0014 creates it).
--
-- publish() inside a transaction sends `SELECT bp_publish_v1(...); COMMIT` as one simple
-- query when the caller commits (docs/decisions/0030-publish-rides-the-commit.md): the
-- arguments come as literals, so a call is planned in microseconds and needs no prepared
-- statement; the statements inside keep their plans for the session.
--
-- Checks the tenant and raises (SQLSTATE BP001: unknown, BP002: inactive) so the whole
-- transaction fails instead of committing without the event; inserts the event key with ON
-- CONFLICT DO NOTHING and, only if the key went in, the outbox row. Returns whether it did.
--
-- Released: never edit this file. A change is bp_publish_v2.sql with a migration that creates it.
CREATE OR REPLACE FUNCTION bp_publish_v1(p_tenant uuid, p_event_id text, p_stream text, p_type text,
                                         p_occurred_at timestamptz, p_payload jsonb, p_bytes int,
                                         p_shard int)
RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    v_active boolean;
BEGIN
    SELECT is_active INTO v_active FROM backplane_tenant WHERE id = p_tenant;
    IF v_active IS NULL THEN
        RAISE EXCEPTION 'unknown tenant' USING ERRCODE = 'BP001';
    ELSIF NOT v_active THEN
        RAISE EXCEPTION 'inactive tenant' USING ERRCODE = 'BP002';
    END IF;
    INSERT INTO backplane_eventkey (tenant_id, event_id) VALUES (p_tenant, p_event_id) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO backplane_outboxitem (tenant_id, kind, stream, event_id, type, occurred_at, payload,
                                      payload_bytes, shard)
    VALUES (p_tenant, 'event', p_stream, p_event_id, p_type, p_occurred_at, p_payload, p_bytes, p_shard);
    RETURN true;
END
$fn$;
