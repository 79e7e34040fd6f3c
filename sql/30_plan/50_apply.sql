-- Applying an event to the account registry: what the target looks like once the event is
-- done. One rule, _apply_event, used by delivery (_apply_done, for _record and _record_many)
-- and by dry runs (_apply_dry_run, for _plan_target and _complete_dry_run).

-- The applied part of an account: what the target has.
CREATE TYPE identity_sync._applied AS (
    state      text,
    attributes jsonb,
    groups     text[],
    remote_id  text
);

-- Group names sorted and distinct, with one more (grant).
CREATE FUNCTION identity_sync._add_group(groups text[], g text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY(SELECT DISTINCT x FROM unnest(groups || g) AS x ORDER BY x)
$$;

-- THE rule: the applied state `a` of an account after `kind` (with `payload`) is done; the
-- target's id for the account, when it gave one, is `remote_id`. No sub-query and no SET clause,
-- so that PostgreSQL inlines it into the statements that use it.
CREATE FUNCTION identity_sync._apply_event(a identity_sync._applied, kind text, payload jsonb, remote_id text)
RETURNS identity_sync._applied LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ROW(
        CASE kind WHEN 'create' THEN CASE WHEN (payload->>'active')::boolean THEN 'active' ELSE 'disabled' END
                  WHEN 'enable' THEN 'active'
                  WHEN 'disable' THEN 'disabled'
                  WHEN 'delete' THEN 'deleted'
                  ELSE (a).state END,
        CASE kind WHEN 'create' THEN payload->'attributes'
                  WHEN 'update' THEN (a).attributes || (payload->'changed')
                  ELSE (a).attributes END,
        CASE kind WHEN 'create' THEN '{}'
                  WHEN 'grant' THEN identity_sync._add_group((a).groups, payload->>'group')
                  WHEN 'revoke' THEN array_remove((a).groups, payload->>'group')
                  WHEN 'delete' THEN '{}'
                  ELSE (a).groups END,
        coalesce(remote_id, (a).remote_id))::identity_sync._applied
$$;

-- Several events of one account in a row (ORDER BY their seq): the aggregate of _apply_event,
-- starting from the applied state `initial`. (PL/pgSQL: an aggregate calls its step function
-- through fmgr for every event, and a SQL function is executed there, not inlined: 13.5 µs an
-- event; PL/pgSQL evaluates the inlined _apply_event as a simple expression: 4.4 µs.)
CREATE FUNCTION identity_sync._apply_event_step(s identity_sync._applied, initial identity_sync._applied,
                                                kind text, payload jsonb, remote_id text)
RETURNS identity_sync._applied LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN identity_sync._apply_event(coalesce(s, initial), kind, payload, remote_id);
END
$$;
CREATE AGGREGATE identity_sync._apply_events(identity_sync._applied, text, jsonb, text) (
    SFUNC = identity_sync._apply_event_step,
    STYPE = identity_sync._applied
);

-- Delivered: mark the events done and bring the accounts' applied state up to date. Set-based
-- (a person has at most one event in flight, so each account is touched once).
CREATE FUNCTION identity_sync._apply_done(ids bigint[], remote_ids text[], statuses int[])
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
    created record;
BEGIN
    PERFORM identity_sync._scratch('_is_done', 'LIKE identity_sync.event, new_remote_id text');
    WITH o AS (SELECT * FROM unnest(ids, remote_ids, statuses) AS o(id, remote_id, status)),
    d AS (
        UPDATE identity_sync.event e
           SET state = 'done', done_at = clock_timestamp(), http_status = o.status, last_error = NULL
          FROM o WHERE e.id = o.id AND e.state = 'sending'
        RETURNING e.*, o.remote_id AS new_remote_id)
    INSERT INTO pg_temp._is_done SELECT * FROM d;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM identity_sync._breaker_closed(ARRAY(SELECT DISTINCT d.target_id FROM pg_temp._is_done d));
    -- Planned anew on each call (EXECUTE): a plan cached by this session would be the one made
    -- when the registry was empty (a new target, right after drop_target's mass deletion): a
    -- sequential scan of every account, and of every dead version of one while an old snapshot
    -- keeps them, for each round of outcomes (5,800 pages a round in bench/run's latency
    -- phase); planned now, it probes the registry's key for each event once the table is big.
    EXECUTE $q$
    UPDATE identity_sync.account a
       SET (state, attributes, groups, remote_id) = (
               SELECT (x).* FROM (SELECT identity_sync._apply_event(ROW(a.state, a.attributes, a.groups, a.remote_id),
                                                                   dn.kind, dn.payload, dn.new_remote_id) AS x) AS q),
           applied_at = clock_timestamp()
      FROM pg_temp._is_done dn
     WHERE a.target_id = dn.target_id AND a.person_key = dn.person_key
    $q$;
    -- A person others refer to (a manager) got an account: re-send the references to it.
    -- (planned anew too, as above: a cached plan read every account for each round)
    -- A target whose accounts refer to nobody is passed over by its own index first: the GIN
    -- index knows no target, so each probe would read every account of every target that
    -- refers to the person, dead ones included (after a mass deletion, hundreds of thousands:
    -- creates right after one ran at 728/s in bench/run, 11 ms a round in this query).
    FOR created IN EXECUTE $q$
            SELECT d.target_id, d.person_key FROM pg_temp._is_done d
             WHERE d.kind = 'create'
               AND EXISTS (SELECT FROM identity_sync.account a WHERE a.target_id = d.target_id AND a.refs <> '{}')
               AND EXISTS (SELECT FROM identity_sync.account a
                            WHERE a.target_id = d.target_id AND a.refs <> '{}' AND a.refs @> ARRAY[d.person_key])
            $q$ LOOP
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

-- A dry-run target's events are done as soon as they are planned (or released): the registry
-- applies them at once, in seq order per person, as delivery would have (the account id is
-- "dry-run:" and the person key).
CREATE FUNCTION identity_sync._apply_dry_run(target_id int, event_ids bigint[])
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE identity_sync.account a
       SET state = (n.applied).state, attributes = (n.applied).attributes, groups = (n.applied).groups,
           remote_id = coalesce((n.applied).remote_id, 'dry-run:' || a.person_key), applied_at = clock_timestamp()
      FROM (SELECT e.person_key,
                   identity_sync._apply_events(ROW(x.state, x.attributes, x.groups, x.remote_id)::identity_sync._applied,
                                               e.kind, e.payload, NULL ORDER BY e.seq) AS applied
              FROM identity_sync.event e
              JOIN identity_sync.account x ON x.target_id = e.target_id AND x.person_key = e.person_key
             WHERE e.id = ANY (event_ids) AND e.target_id = _apply_dry_run.target_id
             GROUP BY e.person_key) AS n
     WHERE a.target_id = _apply_dry_run.target_id AND a.person_key = n.person_key
$$;

-- release() of a held dry-run target: its released events are done at once.
CREATE FUNCTION identity_sync._complete_dry_run(target_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ids bigint[];
BEGIN
    WITH done AS (
        UPDATE identity_sync.event e SET state = 'done', done_at = clock_timestamp(), sent_at = clock_timestamp()
         WHERE e.target_id = _complete_dry_run.target_id AND e.state = 'pending'
        RETURNING e.id)
    SELECT array_agg(id) INTO ids FROM done;
    PERFORM identity_sync._apply_dry_run(target_id, ids);
END
$$;
