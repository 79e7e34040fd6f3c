-- Planning: dirty persons → desired state per target (the compiled mapping + rules query) →
-- diff against the account registry → provisioning events, in one set-based pass per target
-- and batch.

-- Move outbox rows into the deduplicated dirty set. The outbox is append-only on the HR write
-- path; this is where duplicates collapse.
CREATE FUNCTION identity_sync._claim_changes(max_rows int)
RETURNS int LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH c AS (
        DELETE FROM identity_sync.change
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM identity_sync.change LIMIT max_rows FOR UPDATE SKIP LOCKED))
        RETURNING source_id, op, keys, at),
    k AS (
        SELECT DISTINCT ON (key) key, source_id, op, at
          FROM c, unnest(c.keys) AS key
         WHERE key IS NOT NULL
         ORDER BY key, at),
    ins AS (
        INSERT INTO identity_sync._dirty (person_key, target_id, source_id, op, first_at)
        SELECT key, 0, source_id, op, at FROM k
        ON CONFLICT DO NOTHING
        RETURNING 1)
    SELECT count(*)::int FROM k
$$;

-- Desired state of `keys` in target `t` into pg_temp._is_desired, unique values resolved.
-- With record_errors, per-person failures go to _plan_error; otherwise they are returned in
-- the error column only (preview).
CREATE FUNCTION identity_sync._desired(t identity_sync.target, keys text[], today date, record_errors boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k text;
    m record;
    cap int := coalesce((t.options->>'unique_max_iterations')::int, 99);
    conflicted text[];
    it int;
    loops int;
BEGIN
    IF to_regclass('pg_temp._is_desired') IS NULL THEN
        CREATE TEMP TABLE _is_desired (
        person_key text PRIMARY KEY, rules text[], groups text[], attributes jsonb,
        exists_now boolean, enabled_now boolean, creatable_now boolean, iteration int NOT NULL DEFAULT 0, error text
    ) ON COMMIT DELETE ROWS;
    END IF;
    DELETE FROM pg_temp._is_desired;
    IF t.compiled IS NULL THEN
        RETURN;
    END IF;
    PERFORM identity_sync._use_user_search_path();
    BEGIN
        EXECUTE 'INSERT INTO pg_temp._is_desired (person_key, rules, groups, attributes, exists_now, enabled_now, creatable_now) '
                || t.compiled USING keys, today, 0;
    EXCEPTION WHEN OTHERS THEN
        -- One person's data broke the batch (say a subquery returned two rows): evaluate
        -- persons one by one so that only that person fails.
        FOREACH k IN ARRAY keys LOOP
            BEGIN
                EXECUTE 'INSERT INTO pg_temp._is_desired (person_key, rules, groups, attributes, exists_now, enabled_now, creatable_now) '
                        || t.compiled USING ARRAY[k], today, 0;
            EXCEPTION WHEN OTHERS THEN
                INSERT INTO pg_temp._is_desired (person_key, error) VALUES (k, SQLERRM);
            END;
        END LOOP;
    END;

    -- is_unique: iterate the persons whose value is taken (by another person's account, or by
    -- a person earlier in key order in this batch) until their value is free.
    FOR m IN SELECT * FROM identity_sync.mapping WHERE target_id = t.id AND is_unique LOOP
        -- Each unique attribute searches from iteration 0 (its value in attributes is the one
        -- at iteration 0): continuing from where the previous unique attribute stopped gave
        -- values a re-plan would change.
        UPDATE pg_temp._is_desired SET iteration = 0 WHERE iteration <> 0;
        -- On-create-only values of existing accounts are fixed: keep them.
        -- (Sublinks with OFFSET 0 stay index probes per person: the registry outgrows its
        -- statistics during a resync, and a hash of it per batch would be quadratic.)
        UPDATE pg_temp._is_desired d
           SET attributes = jsonb_set(d.attributes, ARRAY[m.attribute],
                 (SELECT a.planned_attributes->m.attribute FROM identity_sync.account a
                   WHERE a.target_id = t.id AND a.person_key = d.person_key))
         WHERE m.on_create_only AND d.error IS NULL
           AND EXISTS (SELECT FROM identity_sync.account a
                        WHERE a.target_id = t.id AND a.person_key = d.person_key
                          AND a.planned_state <> 'deleted' AND a.planned_attributes ? m.attribute OFFSET 0);
        loops := 0;
        LOOP
            SELECT array_agg(x.person_key) INTO conflicted
              FROM (SELECT d.person_key, d.attributes->>m.attribute AS v,
                           -- The person already holding the value keeps it; others in the batch
                           -- vary theirs (else a re-plan could move a value between persons).
                           row_number() OVER (PARTITION BY d.attributes->>m.attribute
                                              ORDER BY EXISTS (SELECT FROM identity_sync._unique h
                                                                WHERE h.target_id = t.id AND h.attribute = m.attribute
                                                                  AND h.value = d.attributes->>m.attribute
                                                                  AND h.person_key = d.person_key) DESC,
                                                       d.person_key) AS rn
                      FROM pg_temp._is_desired d
                     WHERE d.error IS NULL AND d.rules <> '{}' AND d.attributes->>m.attribute IS NOT NULL
                       AND NOT (m.on_create_only AND EXISTS (
                                SELECT FROM identity_sync.account a
                                 WHERE a.target_id = t.id AND a.person_key = d.person_key
                                   AND a.planned_state <> 'deleted' AND a.planned_attributes ? m.attribute
                                OFFSET 0))) AS x
             WHERE x.rn > 1
                OR EXISTS (SELECT FROM identity_sync._unique u
                            WHERE u.target_id = t.id AND u.attribute = m.attribute AND u.value = x.v
                              AND u.person_key IS DISTINCT FROM x.person_key OFFSET 0);
            EXIT WHEN conflicted IS NULL;
            loops := loops + 1;
            FOR it IN SELECT DISTINCT d.iteration + 1 FROM pg_temp._is_desired d WHERE d.person_key = ANY (conflicted) LOOP
                IF it > cap THEN
                    UPDATE pg_temp._is_desired d
                       SET error = format('no free value for unique attribute "%s" after %s iterations (last tried "%s")',
                                          m.attribute, cap, d.attributes->>m.attribute)
                     WHERE d.person_key = ANY (conflicted) AND d.iteration + 1 = it;
                    CONTINUE;
                END IF;
                EXECUTE format('UPDATE pg_temp._is_desired d SET attributes = d.attributes || jsonb_build_object(%L, q.attributes->%L), iteration = $4 '
                               'FROM (%s) AS q WHERE q.person_key = d.person_key',
                               m.attribute, m.attribute, t.compiled)
                  USING ARRAY(SELECT d.person_key FROM pg_temp._is_desired d
                               WHERE d.person_key = ANY (conflicted) AND d.iteration + 1 = it),
                        today, it, it;
            END LOOP;
        END LOOP;
    END LOOP;

    -- Temporary tables have no statistics until analysed; the diff joins on this one.
    ANALYZE pg_temp._is_desired;

    IF record_errors THEN
        INSERT INTO identity_sync._plan_error (target_id, person_key, message)
        SELECT t.id, d.person_key, d.error FROM pg_temp._is_desired d WHERE d.error IS NOT NULL
        ON CONFLICT (target_id, person_key) DO UPDATE SET message = excluded.message, at = now();
        DELETE FROM identity_sync._plan_error e
         WHERE e.target_id = t.id AND e.person_key = ANY (keys)
           AND NOT EXISTS (SELECT FROM pg_temp._is_desired d WHERE d.person_key = e.person_key AND d.error IS NOT NULL);
    END IF;
END
$$;

-- Diff desired state against the registry into pg_temp._is_plan: one row per person with the
-- state it should reach and the events that get it there.
CREATE FUNCTION identity_sync._diff(t identity_sync.target, keys text[], today date)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Attributes sent at creation only never count as changed.
    create_only text[] := ARRAY(SELECT attribute FROM identity_sync.mapping
                                 WHERE target_id = t.id AND on_create_only);
BEGIN
    IF to_regclass('pg_temp._is_plan') IS NULL THEN
        CREATE TEMP TABLE _is_plan (
        person_key text PRIMARY KEY, in_scope boolean, rules text[], has_account boolean,
        planned_state text, want_state text, attributes jsonb, changed jsonb, previous jsonb,
        groups text[], to_grant text[], to_revoke text[], seq bigint, events jsonb,
        n_events int, has_update boolean
    ) ON COMMIT DELETE ROWS;
    END IF;
    DELETE FROM pg_temp._is_plan;

    INSERT INTO pg_temp._is_plan
    SELECT k.person_key, s.in_scope, s.rules, s.has_account, s.planned_state, s.want_state,
           s.attributes, s.changed, s.previous, s.groups, s.to_grant, s.to_revoke, s.seq,
           ev.events, jsonb_array_length(ev.events), ev.events @> '[{"kind": "update"}]'
      FROM unnest(keys) AS k(person_key)
      LEFT JOIN pg_temp._is_desired d USING (person_key)
      -- A probe of the account's primary key per person: the registry grows during a resync
      -- faster than its statistics, and a hash of every account per batch would be quadratic.
      LEFT JOIN LATERAL (SELECT * FROM identity_sync.account x
                          WHERE x.target_id = t.id AND x.person_key = k.person_key OFFSET 0) AS a ON true
     CROSS JOIN LATERAL (
        SELECT coalesce(d.rules <> '{}', false) AS in_scope,
               coalesce(d.rules, '{}') AS rules,
               (a.person_key IS NOT NULL AND a.planned_state <> 'deleted') AS has_account,
               a.planned_state,
               coalesce(a.seq, 0) AS seq,
               -- A person gone from HR is out of scope and, if the target deletes, past it.
               coalesce(d.exists_now, t.options->>'delete_after' IS NULL) AS exists_now,
               coalesce(d.enabled_now, false) AS enabled_now,
               coalesce(d.creatable_now, false) AS creatable_now
         -- OFFSET 0 keeps each lateral step computed once per person instead of being
         -- flattened into (and recomputed by) every expression that uses it.
         OFFSET 0) AS b
     CROSS JOIN LATERAL (
        SELECT CASE
                 WHEN b.has_account THEN
                   CASE WHEN NOT b.exists_now THEN 'deleted'
                        WHEN b.in_scope AND b.enabled_now THEN 'active'
                        ELSE 'disabled' END
                 WHEN b.in_scope AND b.exists_now AND b.creatable_now THEN
                   CASE WHEN b.enabled_now THEN 'active' ELSE 'disabled' END
               END AS want_state OFFSET 0) AS w
     CROSS JOIN LATERAL (
        SELECT b.in_scope, b.rules, b.has_account, b.planned_state, w.want_state, b.seq,
               coalesce(d.attributes, '{}') AS attributes,
               coalesce(ch.changed, '{}') AS changed,
               coalesce(ch.previous, '{}') AS previous,
               g.groups,
               ARRAY(SELECT x FROM unnest(g.groups) AS x
                      WHERE NOT (b.has_account AND x = ANY (a.planned_groups)) ORDER BY x) AS to_grant,
               ARRAY(SELECT x FROM unnest(CASE WHEN b.has_account THEN a.planned_groups ELSE '{}' END) AS x
                      WHERE x <> ALL (g.groups) ORDER BY x) AS to_revoke
          FROM (SELECT CASE WHEN w.want_state IN ('active', 'disabled') AND b.in_scope
                            THEN ARRAY(SELECT DISTINCT x FROM unnest(coalesce(d.groups, '{}')
                                         || identity_sync._granted_groups(t.id, k.person_key, b.enabled_now)) AS x ORDER BY x)
                            ELSE '{}'::text[] END AS groups OFFSET 0) AS g
          LEFT JOIN LATERAL (
            SELECT jsonb_object_agg(e.key, e.value) AS changed,
                   jsonb_object_agg(e.key, a.planned_attributes->e.key) AS previous
              FROM jsonb_each(d.attributes) AS e
             WHERE b.has_account AND a.planned_attributes IS DISTINCT FROM d.attributes  -- fast path
               AND e.key <> ALL (create_only)
               AND a.planned_attributes->e.key IS DISTINCT FROM e.value) AS ch ON true OFFSET 0) AS s
     -- The events, in the order they must be delivered.
     CROSS JOIN LATERAL (
        SELECT coalesce(jsonb_agg(jsonb_build_object('kind', e.kind, 'payload', e.payload) ORDER BY e.ord, e.sub), '[]') AS events
          FROM (
            SELECT 1 AS ord, '' AS sub, 'delete' AS kind, '{}'::jsonb AS payload
             WHERE s.has_account AND s.want_state = 'deleted'
            UNION ALL
            SELECT 2, '', 'create', jsonb_build_object('attributes', s.attributes, 'active', s.want_state = 'active', 'groups', s.groups)
             WHERE NOT s.has_account AND s.want_state IN ('active', 'disabled')
            UNION ALL
            SELECT 3, '', 'enable', jsonb_build_object('active', true)
             WHERE s.has_account AND s.planned_state = 'disabled' AND s.want_state = 'active'
            UNION ALL
            SELECT 4, '', 'update', jsonb_build_object('changed', s.changed, 'previous', s.previous, 'attributes', s.attributes)
             WHERE s.has_account AND s.want_state <> 'deleted' AND s.changed <> '{}'
            UNION ALL
            SELECT 5, g, 'grant', jsonb_build_object('group', g)
              FROM unnest(s.to_grant) AS g WHERE s.want_state IN ('active', 'disabled')
            UNION ALL
            SELECT 6, g, 'revoke', jsonb_build_object('group', g)
              FROM unnest(s.to_revoke) AS g WHERE s.want_state IN ('active', 'disabled')
            UNION ALL
            SELECT 7, '', 'disable', jsonb_build_object('active', false)
             WHERE s.has_account AND s.planned_state = 'active' AND s.want_state = 'disabled'
          ) AS e) AS ev
     WHERE d.error IS NULL;
END
$$;

-- Does a threshold stop this target? A threshold bounds the events of its kind planned in the
-- last hour since the last release(), this plan's included (`planned`: kind -> count).
CREATE FUNCTION identity_sync._check_thresholds(t identity_sync.target, planned jsonb)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    opt text;
    guarded text;   -- not "kind": that is also a column of _plan_count
    lim text;
    total bigint;
    accounts bigint;
    allowed numeric;
BEGIN
    FOREACH opt IN ARRAY ARRAY['max_creates', 'max_disables', 'max_deletes'] LOOP
        lim := t.options->>opt;
        guarded := CASE opt WHEN 'max_creates' THEN 'create' WHEN 'max_disables' THEN 'disable' ELSE 'delete' END;
        CONTINUE WHEN lim IS NULL OR coalesce((planned->>guarded)::int, 0) = 0;
        -- This plan's counts are in _plan_count already (_plan_target records them first).
        SELECT coalesce(sum(c.n), 0) INTO total
          FROM identity_sync._plan_count c
         WHERE c.target_id = t.id AND c.kind = guarded
           AND c.at > greatest(now() - interval '1 hour', coalesce(t.released_at, '-infinity'));
        IF lim LIKE '%\%%' THEN
            SELECT count(*) INTO accounts FROM identity_sync.account a
             WHERE a.target_id = t.id AND a.state <> 'deleted';
            allowed := floor(accounts * rtrim(btrim(lim), '%')::numeric / 100);
        ELSE
            allowed := lim::numeric;
        END IF;
        IF total > allowed THEN
            RETURN jsonb_build_object('threshold', opt, 'limit', lim, 'allowed', allowed,
                                      'planned', total, 'kind', guarded, 'since', now());
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- Plan one target for a set of persons: write events and the registry's planned state.
CREATE FUNCTION identity_sync._plan_target(t identity_sync.target, keys text[], plan_id bigint)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    today date := identity_sync._today();
    n int;
    hold jsonb;
    m record;
    dry boolean;
    counts jsonb;
    -- Only targets that map person_ref() values need their references indexed.
    has_refs boolean := EXISTS (SELECT FROM identity_sync.mapping mp WHERE mp.target_id = t.id AND mp.expression ~* 'person_ref');
BEGIN
    PERFORM identity_sync._desired(t, keys, today, true);
    PERFORM identity_sync._diff(t, keys, today);

    ANALYZE pg_temp._is_plan;

    -- Coalesce: an update for a person whose last event is a create or update nobody has
    -- picked up yet is folded into that event, which then carries the latest state.
    WITH last AS (
        SELECT e.id, e.person_key, e.kind, e.state, e.attempts
          FROM pg_temp._is_plan p JOIN identity_sync.event e
            ON e.target_id = t.id AND e.person_key = p.person_key AND e.seq = p.seq
         WHERE p.has_update),
    merged AS (
        UPDATE identity_sync.event e
           SET payload = CASE e.kind
                   WHEN 'create' THEN jsonb_set(e.payload, '{attributes}', e.payload->'attributes' || p.changed)
                   ELSE jsonb_build_object('changed', (e.payload->'changed') || p.changed,
                                           'previous', p.previous || (e.payload->'previous'),
                                           'attributes', p.attributes) END
          FROM last l JOIN pg_temp._is_plan p USING (person_key)
         WHERE e.id = l.id AND l.kind IN ('create', 'update') AND l.state IN ('pending', 'held')
           AND l.attempts = 0
        RETURNING e.person_key)
    UPDATE pg_temp._is_plan p
       SET events = (SELECT coalesce(jsonb_agg(x ORDER BY o), '[]')
                       FROM jsonb_array_elements(p.events) WITH ORDINALITY AS j(x, o)
                      WHERE x->>'kind' <> 'update'),
           n_events = p.n_events - 1,   -- a plan has at most one update per person
           has_update = false
      FROM merged WHERE merged.person_key = p.person_key;

    -- Thresholds hold the whole target until an operator releases or discards.
    SELECT jsonb_object_agg(k, c) INTO counts
      FROM (SELECT x->>'kind' AS k, count(*) AS c
              FROM pg_temp._is_plan p, jsonb_array_elements(p.events) AS x
             WHERE p.n_events > 0 AND x->>'kind' IN ('create', 'disable', 'delete') GROUP BY 1) AS q;
    IF counts IS NOT NULL THEN
        INSERT INTO identity_sync._plan_count (target_id, kind, n)
        SELECT t.id, k, v::int FROM jsonb_each_text(counts) AS e(k, v);
        IF t.held IS NULL THEN
            hold := identity_sync._check_thresholds(t, counts);
            IF hold IS NOT NULL THEN
                UPDATE identity_sync.target SET held = hold WHERE id = t.id;
                UPDATE identity_sync.event SET state = 'held' WHERE target_id = t.id AND state = 'pending';
                t.held := hold;
                RAISE LOG 'identity_sync: target "%" held: % % events planned within the hour, % allows %',
                    t.name, hold->>'planned', hold->>'kind', hold->>'threshold', hold->>'allowed';
            END IF;
        END IF;
    END IF;

    -- A dry-run target (not held) records its events as done at once, and the registry takes
    -- the planned state as applied: the state the target would have.
    dry := coalesce((t.options->>'dry_run')::boolean, false) AND t.held IS NULL;
    INSERT INTO identity_sync.event (target_id, person_key, seq, kind, payload, state, plan_id, sent_at, done_at)
    SELECT t.id, p.person_key, p.seq + e.o, e.x->>'kind', e.x->'payload',
           CASE WHEN t.held IS NOT NULL THEN 'held' WHEN dry THEN 'done' ELSE 'pending' END, plan_id,
           CASE WHEN dry THEN now() END, CASE WHEN dry THEN now() END
      FROM pg_temp._is_plan p, jsonb_array_elements(p.events) WITH ORDINALITY AS e(x, o)
     WHERE p.n_events > 0;
    GET DIAGNOSTICS n = ROW_COUNT;

    -- The registry's planned state is what the target will look like once events are done.
    INSERT INTO identity_sync.account AS a (target_id, person_key, planned_state, planned_attributes, planned_groups, refs, seq, planned_at,
                                           state, attributes, groups, remote_id, applied_at)
    SELECT t.id, p.person_key, p.want_state, p.attributes, p.groups,
           CASE WHEN has_refs THEN identity_sync._refs(p.attributes) ELSE '{}' END, p.seq + p.n_events, now(),
           CASE WHEN dry THEN p.want_state ELSE 'pending' END,
           CASE WHEN dry THEN p.attributes ELSE '{}' END,
           CASE WHEN dry THEN p.groups ELSE '{}' END,
           CASE WHEN dry THEN 'dry-run:' || p.person_key END,
           CASE WHEN dry THEN now() END
      FROM pg_temp._is_plan p
     -- Nothing the target sees changed: nothing to write (a resync of unchanged persons). An
     -- update folded into an earlier event leaves no event of its own but changes the plan.
     WHERE p.want_state IS NOT NULL AND (p.n_events > 0 OR p.changed <> '{}' OR NOT p.has_account
                                         OR p.planned_state IS DISTINCT FROM p.want_state)
    ON CONFLICT (target_id, person_key) DO UPDATE
       SET planned_state = excluded.planned_state,
           planned_attributes = CASE WHEN excluded.planned_state = 'deleted' THEN a.planned_attributes ELSE excluded.planned_attributes END,
           planned_groups = CASE WHEN excluded.planned_state = 'deleted' THEN '{}' ELSE excluded.planned_groups END,
           refs = excluded.refs,
           remote_id = CASE WHEN dry THEN coalesce(a.remote_id, excluded.remote_id)
                            WHEN a.planned_state = 'deleted' AND excluded.planned_state <> 'deleted' THEN NULL
                            ELSE a.remote_id END,
           state = CASE WHEN dry THEN excluded.state
                        WHEN a.planned_state = 'deleted' AND excluded.planned_state <> 'deleted' THEN 'pending'
                        ELSE a.state END,
           attributes = CASE WHEN dry AND excluded.planned_state <> 'deleted' THEN excluded.planned_attributes ELSE a.attributes END,
           groups = CASE WHEN dry THEN excluded.planned_groups ELSE a.groups END,
           applied_at = CASE WHEN dry THEN now() ELSE a.applied_at END,
           seq = excluded.seq,
           planned_at = excluded.planned_at
           -- (a dry run applies what it plans; see above)
     WHERE a.planned_state IS DISTINCT FROM excluded.planned_state
        OR a.planned_attributes IS DISTINCT FROM excluded.planned_attributes
        OR a.planned_groups IS DISTINCT FROM excluded.planned_groups
        OR a.seq IS DISTINCT FROM excluded.seq;

    -- Unique values now held by these persons.
    FOR m IN SELECT * FROM identity_sync.mapping WHERE target_id = t.id AND is_unique LOOP
        -- Driven by the planned persons (index on _unique (target_id, person_key)), whatever
        -- _unique's statistics say while a resync grows it.
        DELETE FROM identity_sync._unique u
         USING (SELECT x.ctid AS row
                  FROM pg_temp._is_plan p
                 CROSS JOIN LATERAL (
                    SELECT v.ctid FROM identity_sync._unique v
                     WHERE v.target_id = t.id AND v.person_key = p.person_key AND v.attribute = m.attribute
                       AND NOT (p.want_state IS NOT NULL AND p.want_state IN ('active', 'disabled')
                                AND v.value IS NOT DISTINCT FROM p.attributes->>m.attribute)
                    OFFSET 0) AS x
                 WHERE p.n_events > 0 OR p.changed <> '{}' OR p.want_state IS NULL) AS gone
         WHERE u.ctid = gone.row;
        INSERT INTO identity_sync._unique (target_id, attribute, value, person_key)
        SELECT t.id, m.attribute, p.attributes->>m.attribute, p.person_key
          FROM pg_temp._is_plan p
         WHERE (p.n_events > 0 OR p.changed <> '{}') AND p.want_state IN ('active', 'disabled') AND p.attributes->>m.attribute IS NOT NULL
        ON CONFLICT (target_id, attribute, value) DO UPDATE SET person_key = excluded.person_key
         WHERE _unique.person_key IS DISTINCT FROM excluded.person_key;
    END LOOP;

    RETURN n;
END
$$;

-- Person keys referenced by attribute values made with identity_sync.person_ref().
CREATE FUNCTION identity_sync._refs(attributes jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(DISTINCT v->>'$person'), '{}')
      FROM jsonb_each(attributes) AS e(k, v)
     WHERE jsonb_typeof(v) = 'object' AND v ? '$person'
$$;

-- An attribute value that refers to another person (e.g. a manager): the payload carries that
-- person's account id in the same target, resolved at delivery.
CREATE FUNCTION identity_sync.person_ref(person_key anyelement) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN person_key IS NULL THEN NULL ELSE jsonb_build_object('$person', person_key::text) END
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

-- One planner transaction: claim outbox rows and a batch of dirty persons, plan every target.
-- Returns the number of persons planned (0: nothing was dirty).
CREATE FUNCTION identity_sync._plan(batch_size int DEFAULT 1000)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    claimed int;
    t identity_sync.target;
    keys text[];
    all_keys text[];
    plan_id bigint;
    n_events int := 0;
BEGIN
    -- Plans made for each execution: cached generic plans would be the ones made while the
    -- registry was small (a new target, the first batches of a resync), a sequential scan that
    -- is right for a hundred accounts and ruinous for a hundred thousand (bench/run saw batches
    -- go from 0.2 s to 18 s). For this transaction only: delivery keeps its cached plans.
    PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);
    PERFORM identity_sync._claim_changes(greatest(batch_size / 10, 10));
    IF to_regclass('pg_temp._is_batch') IS NULL THEN
        CREATE TEMP TABLE _is_batch (person_key text, target_id int) ON COMMIT DELETE ROWS;
    END IF;
    DELETE FROM pg_temp._is_batch;
    WITH b AS (
        SELECT person_key, target_id FROM identity_sync._dirty
         ORDER BY first_at LIMIT batch_size FOR UPDATE SKIP LOCKED),
    d AS (
        DELETE FROM identity_sync._dirty x USING b
         WHERE x.person_key = b.person_key AND x.target_id = b.target_id
        RETURNING x.person_key, x.target_id)
    INSERT INTO pg_temp._is_batch SELECT * FROM d;
    GET DIAGNOSTICS claimed = ROW_COUNT;
    IF claimed = 0 THEN
        RETURN 0;
    END IF;
    SELECT array_agg(DISTINCT person_key) INTO all_keys FROM pg_temp._is_batch;
    INSERT INTO identity_sync.plan_run (persons, keys) VALUES (cardinality(all_keys), all_keys)
    RETURNING id INTO plan_id;
    FOR t IN SELECT * FROM identity_sync.target WHERE compiled IS NOT NULL ORDER BY id LOOP
        SELECT array_agg(DISTINCT person_key) INTO keys FROM pg_temp._is_batch WHERE target_id IN (0, t.id);
        CONTINUE WHEN keys IS NULL;
        n_events := n_events + identity_sync._plan_target(t, keys, plan_id);
    END LOOP;
    UPDATE identity_sync.plan_run SET events = n_events WHERE id = plan_id;
    RETURN claimed;
END
$$;
