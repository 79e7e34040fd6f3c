-- Applying an event to the account registry: what the target looks like once the event is
-- done. Used by delivery (_record, _record_many) and by dry runs (_complete_dry_run).

-- Delivered: mark the events done and bring the accounts' applied state up to date. Set-based
-- (a person has at most one event in flight, so each account is touched once).
CREATE FUNCTION identity_sync._apply_done(ids bigint[], remote_ids text[], statuses int[])
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
    created record;
BEGIN
    IF to_regclass('pg_temp._is_done') IS NULL THEN
        CREATE TEMP TABLE _is_done (LIKE identity_sync.event, new_remote_id text) ON COMMIT DELETE ROWS;
    END IF;
    DELETE FROM pg_temp._is_done;
    WITH o AS (SELECT * FROM unnest(ids, remote_ids, statuses) AS o(id, remote_id, status)),
    d AS (
        UPDATE identity_sync.event e
           SET state = 'done', done_at = clock_timestamp(), http_status = o.status, last_error = NULL
          FROM o WHERE e.id = o.id AND e.state = 'sending'
        RETURNING e.*, o.remote_id AS new_remote_id)
    INSERT INTO pg_temp._is_done SELECT * FROM d;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE identity_sync.account a
       SET remote_id = coalesce(dn.new_remote_id, a.remote_id),
           state = CASE dn.kind
                     WHEN 'create' THEN CASE WHEN (dn.payload->>'active')::boolean THEN 'active' ELSE 'disabled' END
                     WHEN 'enable' THEN 'active'
                     WHEN 'disable' THEN 'disabled'
                     WHEN 'delete' THEN 'deleted'
                     ELSE a.state END,
           attributes = CASE dn.kind
                     WHEN 'create' THEN dn.payload->'attributes'
                     WHEN 'update' THEN a.attributes || (dn.payload->'changed')
                     ELSE a.attributes END,
           groups = CASE dn.kind
                     WHEN 'create' THEN '{}'
                     WHEN 'grant' THEN ARRAY(SELECT DISTINCT x FROM unnest(a.groups || (dn.payload->>'group')) AS x ORDER BY x)
                     WHEN 'revoke' THEN array_remove(a.groups, dn.payload->>'group')
                     WHEN 'delete' THEN '{}'
                     ELSE a.groups END,
           applied_at = clock_timestamp()
      FROM pg_temp._is_done dn
     WHERE a.target_id = dn.target_id AND a.person_key = dn.person_key;
    -- A person others refer to (a manager) got an account: re-send the references to it.
    FOR created IN SELECT d.target_id, d.person_key FROM pg_temp._is_done d
              WHERE d.kind = 'create'
                AND EXISTS (SELECT FROM identity_sync.account a
                             WHERE a.target_id = d.target_id AND a.refs <> '{}' AND a.refs @> ARRAY[d.person_key]) LOOP
        WITH r AS (
            SELECT a.target_id, a.person_key, a.seq,
                   (SELECT jsonb_object_agg(x.key, x.value) FROM jsonb_each(a.planned_attributes) AS x
                     WHERE x.value = jsonb_build_object('$person', created.person_key)) AS changed
              FROM identity_sync.account a
             -- (refs <> '{}' lets the partial GIN index answer)
             WHERE a.target_id = created.target_id AND a.refs <> '{}' AND a.refs @> ARRAY[created.person_key]
               AND a.planned_state IN ('active', 'disabled') AND a.person_key <> created.person_key
               FOR UPDATE),
        ins AS (
            INSERT INTO identity_sync.event (target_id, person_key, seq, kind, payload)
            SELECT r.target_id, r.person_key, r.seq + 1, 'update',
                   jsonb_build_object('changed', r.changed, 'previous', '{}'::jsonb, 'attributes', a.planned_attributes)
              FROM r JOIN identity_sync.account a USING (target_id, person_key)
             WHERE r.changed IS NOT NULL
            RETURNING target_id, person_key, seq)
        UPDATE identity_sync.account a SET seq = ins.seq FROM ins
         WHERE a.target_id = ins.target_id AND a.person_key = ins.person_key;
    END LOOP;
    RETURN n;
END
$$;

CREATE FUNCTION identity_sync._complete_dry_run(target_id int)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH done AS (
        UPDATE identity_sync.event e SET state = 'done', done_at = clock_timestamp(), sent_at = clock_timestamp()
         WHERE e.target_id = _complete_dry_run.target_id AND e.state = 'pending'
        RETURNING e.person_key)
    UPDATE identity_sync.account a
       SET state = a.planned_state, attributes = a.planned_attributes, groups = a.planned_groups,
           remote_id = coalesce(a.remote_id, 'dry-run:' || a.person_key), applied_at = clock_timestamp()
     WHERE a.target_id = _complete_dry_run.target_id AND a.person_key IN (SELECT person_key FROM done)
$$;
