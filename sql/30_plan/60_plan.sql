-- Planning: dirty persons → desired state per target (the compiled mapping + rules query) →
-- diff against the account registry → provisioning events, in one set-based pass per target
-- and batch.

-- When HR transaction `xid` committed: noted by the capturing backend at commit
-- (src/shmem.rs, _commit_time), else from track_commit_timestamp when it is on, else unknown.
CREATE FUNCTION identity_sync._committed_at(xid xid8) RETURNS timestamptz
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(identity_sync._commit_time(xid::text::bigint),
                    CASE WHEN current_setting('track_commit_timestamp')::boolean
                         THEN pg_xact_commit_timestamp(xid::xid) END)
$$;

-- Move outbox rows into the deduplicated dirty set. The outbox is append-only on the HR write
-- path; this is where duplicates collapse. Each outbox row goes to change_log (what it was,
-- which transaction, when it committed) and each person remembers which changes made it dirty
-- (up to 50), for plan_cause and trace(). With several person sources (15_sources.sql) the
-- outbox holds each source's own keys: _link_keys turns them into person keys here.
-- (PL/pgSQL, not SQL: a SQL function's statement is parsed and planned at every call, which
-- was 0.4 ms of each of the worker's planning transactions; this one's plan is cached.)
CREATE FUNCTION identity_sync._claim_changes(max_rows int)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    WITH c AS (
        DELETE FROM identity_sync.change
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM identity_sync.change LIMIT max_rows FOR UPDATE SKIP LOCKED))
        RETURNING id, source_id, op, keys, at, xid),
    logged AS (
        INSERT INTO identity_sync.change_log (id, source_id, source, op, persons, xid, started_at, committed_at)
        SELECT c.id, c.source_id, (SELECT s.relation::text FROM identity_sync.source s WHERE s.id = c.source_id),
               c.op, cardinality(c.keys), c.xid, c.at, identity_sync._committed_at(c.xid)
          FROM c),
    k AS (
        SELECT DISTINCT ON (key) key, source_id, op, at, array_agg(id) OVER (PARTITION BY key) AS ids
          FROM c, unnest(CASE WHEN (SELECT identity_sync._several_sources()) AND c.source_id IS NOT NULL
                                   AND c.op NOT IN ('truncate', 'affected_timeout')
                              THEN identity_sync._link_keys(c.source_id, c.keys) ELSE c.keys END) AS key
         WHERE key IS NOT NULL
         ORDER BY key, at, id),
    ins AS (
        INSERT INTO identity_sync._dirty AS d (person_key, target_id, source_id, op, first_at, change_ids)
        SELECT key, 0, source_id, op, at, ids FROM k
        ON CONFLICT (person_key, target_id) DO UPDATE
           SET change_ids = CASE WHEN cardinality(d.change_ids) >= 50 THEN d.change_ids
                                 ELSE d.change_ids || excluded.change_ids END
        RETURNING 1),
    -- A related source whose affected query ran past identity_sync.capture_timeout in the HR
    -- write recorded no keys (src/capture.rs): everybody is planned instead.
    everyone AS (
        SELECT c.id, c.source_id, c.at FROM c WHERE c.op = 'affected_timeout' ORDER BY c.at LIMIT 1),
    all_ins AS (
        INSERT INTO identity_sync._dirty (person_key, target_id, source_id, op, first_at, change_ids)
        SELECT x.key, 0, e.source_id, 'affected_timeout', e.at, ARRAY[e.id]
          FROM everyone e
         -- (lateral: the person source is read only when there is such a row)
         CROSS JOIN LATERAL (SELECT unnest(identity_sync._all_person_keys()) AS key WHERE e.at IS NOT NULL) AS x
        ON CONFLICT DO NOTHING
        RETURNING 1)
    SELECT (SELECT count(*) FROM k)::int + (SELECT count(*) FROM all_ins)::int INTO n;
    RETURN n;
END
$$;

-- The causes of the batch a plan claimed (pg_temp._is_batch, _plan): per captured change, the
-- persons it named; per other cause (resync, lifecycle, conflict, ...), the persons it marked.
-- The plan run's caused_at is the earliest of them (a commit, else when it was asked for).
CREATE FUNCTION identity_sync._record_causes(plan_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    WITH c AS (
        SELECT nullif(b.target_id, 0) AS target_id, x.change_id, coalesce(l.op, b.op) AS op,
               min(b.first_at) AS at, min(coalesce(l.committed_at, l.started_at, b.first_at)) AS caused_at,
               array_agg(b.person_key ORDER BY b.person_key) AS keys
          FROM pg_temp._is_batch b
         CROSS JOIN LATERAL unnest(CASE WHEN b.change_ids = '{}' THEN ARRAY[NULL::bigint] ELSE b.change_ids END) AS x(change_id)
          LEFT JOIN identity_sync.change_log l ON l.id = x.change_id
         GROUP BY 1, 2, 3),
    ins AS (
        INSERT INTO identity_sync.plan_cause (plan_id, target_id, change_id, op, at, keys)
        SELECT _record_causes.plan_id, c.target_id, c.change_id, c.op, c.at, c.keys FROM c)
    UPDATE identity_sync.plan_run p SET caused_at = (SELECT min(c.caused_at) FROM c)
     WHERE p.id = _record_causes.plan_id;
END
$$;

-- A plan run whose persons have one cause without a change row (a reconcile's repair or
-- adoption, 48_reconcile.sql): the run and its cause; returns the plan id.
CREATE FUNCTION identity_sync._plan_run(keys text[], target_id int, op text, at timestamptz)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    plan_id bigint;
BEGIN
    INSERT INTO identity_sync.plan_run (persons, keys, caused_at) VALUES (cardinality(keys), keys, at)
    RETURNING id INTO plan_id;
    INSERT INTO identity_sync.plan_cause (plan_id, target_id, change_id, op, at, keys)
    VALUES (plan_id, _plan_run.target_id, NULL, op, at, keys);
    RETURN plan_id;
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

-- Plans of one target are made one at a time: the worker's batches and sync_person() (another
-- session) would otherwise both number a person's next events from the same account.seq. A
-- transaction lock, taken per target in id order by every planner (_plan and sync_person
-- go through the targets by id), so two planners never wait for each other in a circle.
CREATE FUNCTION identity_sync._lock_target_plans(target_id int) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pg_advisory_xact_lock('identity_sync.target'::pg_catalog.regclass::oid::int, target_id)
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
    dry_events bigint[];
    new_events bigint[];
    counts jsonb;
    -- Notification rules on account events of this target (55_notify.sql): without any, the
    -- events planned are not collected for them.
    notify boolean := identity_sync._has_notifications(ARRAY['create', 'update', 'enable', 'disable', 'delete'], t.id);
    -- Only targets that map person_ref() values need their references indexed.
    has_refs boolean := EXISTS (SELECT FROM identity_sync.mapping mp WHERE mp.target_id = t.id AND mp.expression ~* 'person_ref');
BEGIN
    -- One planner per target at a time; what another one committed meanwhile (a hold) counts.
    PERFORM identity_sync._lock_target_plans(t.id);
    SELECT * INTO t FROM identity_sync.target x WHERE x.id = t.id;
    IF NOT FOUND OR t.compiled IS NULL THEN
        RETURN 0;   -- dropped, or left without a person source, meanwhile
    END IF;
    -- Orphans (accounts of nobody that reconcile retires) have no desired state: only persons
    -- are evaluated, and the diff retires the orphans.
    IF EXISTS (SELECT FROM identity_sync.account a WHERE a.target_id = t.id AND a.orphan) THEN
        PERFORM identity_sync._desired(t, ARRAY(SELECT k FROM unnest(keys) AS k
                                                 WHERE NOT EXISTS (SELECT FROM identity_sync.account a
                                                                    WHERE a.target_id = t.id AND a.person_key = k AND a.orphan)),
                                       today, true);
    ELSE
        PERFORM identity_sync._desired(t, keys, today, true);
    END IF;
    -- While a reconcile adopts the target's existing accounts (48_reconcile.sql), persons
    -- without an account are linked to the scanned account that correlates first.
    IF t.adopting IS NOT NULL THEN
        PERFORM identity_sync._adopt(t);
    END IF;
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
                -- (retries too: nothing goes out until an operator has decided)
                UPDATE identity_sync.event SET state = 'held' WHERE target_id = t.id AND state IN ('pending', 'retry');
                t.held := hold;
                RAISE LOG 'identity_sync: target "%" held: % % events planned within the hour, % allows %',
                    t.name, hold->>'planned', hold->>'kind', hold->>'threshold', hold->>'allowed';
                -- One notice per hold, not one per held event (theirs wait for the release).
                PERFORM identity_sync._notify_target('target_held', t.id, format('hold %s %s', t.id, hold->>'since'), hold);
            END IF;
        END IF;
    END IF;

    -- A dry-run target (not held) records its events as done at once, and the registry applies
    -- them (below, _apply_dry_run): the state the target would have.
    dry := coalesce((t.options->>'dry_run')::boolean, false) AND t.held IS NULL;
    WITH ins AS (
        INSERT INTO identity_sync.event (target_id, person_key, seq, kind, payload, state, plan_id, sent_at, done_at)
        SELECT t.id, p.person_key, p.seq + e.o, e.x->>'kind', e.x->'payload',
               CASE WHEN t.held IS NOT NULL THEN 'held' WHEN dry THEN 'done' ELSE 'pending' END, plan_id,
               CASE WHEN dry THEN now() END, CASE WHEN dry THEN now() END
          FROM pg_temp._is_plan p, jsonb_array_elements(p.events) WITH ORDINALITY AS e(x, o)
         WHERE p.n_events > 0
        RETURNING id)
    SELECT count(*), CASE WHEN dry OR notify THEN array_agg(id) END INTO n, new_events FROM ins;
    dry_events := CASE WHEN dry THEN new_events END;

    -- The registry's planned state is what the target will look like once events are done.
    INSERT INTO identity_sync.account AS a (target_id, person_key, planned_state, planned_attributes, planned_groups, refs, seq, planned_at)
    SELECT t.id, p.person_key, p.want_state, p.attributes, p.groups,
           CASE WHEN has_refs THEN identity_sync._refs(p.attributes) ELSE '{}' END, p.seq + p.n_events, now()
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
           remote_id = CASE WHEN a.planned_state = 'deleted' AND excluded.planned_state <> 'deleted' THEN NULL
                            ELSE a.remote_id END,
           state = CASE WHEN a.planned_state = 'deleted' AND excluded.planned_state <> 'deleted' THEN 'pending'
                        ELSE a.state END,
           seq = excluded.seq,
           planned_at = excluded.planned_at
     WHERE a.planned_state IS DISTINCT FROM excluded.planned_state
        OR a.planned_attributes IS DISTINCT FROM excluded.planned_attributes
        OR a.planned_groups IS DISTINCT FROM excluded.planned_groups
        OR a.seq IS DISTINCT FROM excluded.seq;
    IF dry THEN
        PERFORM identity_sync._apply_dry_run(t.id, dry_events);
    END IF;
    -- Notices of the account events planned, in this transaction (held ones wait for release).
    IF notify AND n > 0 THEN
        PERFORM identity_sync._notify_events(t, new_events, dry, t.held IS NOT NULL);
    END IF;

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

-- A target whose planning failed (60_plan.sql, _plan): the error, attempts in a row and the
-- next attempt (core's backoff, _retry_delay); its persons wait in _deferred meanwhile.
CREATE FUNCTION identity_sync._plan_failed(t identity_sync.target, message text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    retry_at timestamptz := now() + identity_sync._retry_delay(t.plan_failures + 1);
BEGIN
    UPDATE identity_sync.target
       SET plan_failures = plan_failures + 1, plan_failed_at = coalesce(plan_failed_at, now()),
           plan_error = message, plan_retry_at = retry_at
     WHERE id = t.id;
    PERFORM identity_sync._defer(t.id);
    IF t.plan_failed_at IS NULL THEN
        -- The first failure of a streak is told (55_notify.sql), not every retry.
        PERFORM identity_sync._notify_target('plan_errors', t.id, format('plan failure %s %s', t.id, now()),
                                             jsonb_build_object('error', message, 'next_attempt', retry_at));
        RAISE WARNING 'identity_sync: planning target "%" failed: %', t.name, message
            USING DETAIL = 'Other targets go on; this one is tried again with backoff (status shows it).';
    ELSE
        RAISE LOG 'identity_sync: planning target "%" failed again (attempt %): %', t.name, t.plan_failures + 1, message;
    END IF;
END
$$;

-- The persons of this batch (pg_temp._is_batch) for target `target_id` wait for its next plan
-- attempt.
CREATE FUNCTION identity_sync._defer(target_id int)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._deferred (target_id, person_key, source_id, op, first_at, change_ids)
    SELECT DISTINCT ON (b.person_key) _defer.target_id, b.person_key, b.source_id, b.op, b.first_at, b.change_ids
      FROM pg_temp._is_batch b WHERE b.target_id IN (0, _defer.target_id)
     ORDER BY b.person_key, b.first_at
    ON CONFLICT (target_id, person_key) DO NOTHING
$$;

-- Deferred persons of targets whose next plan attempt is due go back to the dirty set: a
-- batch's worth while the target still fails (one attempt per retry), all once it plans again.
CREATE FUNCTION identity_sync._undefer(batch_size int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
BEGIN
    FOR t IN SELECT x.* FROM identity_sync.target x
              WHERE (x.plan_retry_at IS NULL OR x.plan_retry_at <= now())
                AND EXISTS (SELECT FROM identity_sync._deferred d WHERE d.target_id = x.id) LOOP
        WITH back AS (
            DELETE FROM identity_sync._deferred d
             WHERE d.target_id = t.id
               AND (t.plan_failed_at IS NULL
                    OR d.person_key IN (SELECT y.person_key FROM identity_sync._deferred y
                                         WHERE y.target_id = t.id ORDER BY y.first_at LIMIT batch_size))
            RETURNING d.*)
        INSERT INTO identity_sync._dirty (person_key, target_id, source_id, op, first_at, change_ids)
        SELECT person_key, target_id, source_id, op, first_at, change_ids FROM back
        ON CONFLICT DO NOTHING;
    END LOOP;
END
$$;

-- One planner transaction: claim outbox rows and a batch of dirty persons, plan every target.
-- Returns the number of persons planned (0: nothing was dirty).
--
-- Each target is planned in a subtransaction of its own: a target whose user SQL times out or
-- fails as a whole (a mapping past statement_timeout, an error before any expression ran) is
-- marked failing and its persons deferred (_plan_failed), and the others are planned as if it
-- were not there. It is tried again with backoff, or at once after a configuration change
-- (_compile) or retry(target).
CREATE FUNCTION identity_sync._plan(batch_size int)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    claimed int;
    t identity_sync.target;
    keys text[];
    all_keys text[];
    plan_id bigint;
    n_events int := 0;
    -- Where the last batch's claim ended (this session's, in the GUC identity_sync_plan.from):
    -- the persons a batch claims are deleted from _dirty, and while an old snapshot is held (a
    -- session in wait_idle, a report) their index entries stay; a claim from the head walked
    -- all of them, 100,000 on average per batch of a 200,000-person resync (30 ms a batch).
    -- So a claim starts after the last one, and from the head again when that finds less than
    -- a batch, or when the last scan from the head is a second old: a person marked dirty with
    -- an earlier first_at (an HR commit that took long) waits at most that long.
    mark jsonb := nullif(current_setting('identity_sync_plan.from', true), '')::jsonb;
    from_at timestamptz := '-infinity';
    from_key text := '';
    from_target int := -1;
    full_at timestamptz := (mark->>'full_at')::timestamptz;
    more int;
    seqscan text := current_setting('enable_seqscan');
    bitmapscan text := current_setting('enable_bitmapscan');
    sort text := current_setting('enable_sort');
BEGIN
    -- (its plan cached: the outbox has no index to choose, and the dirty set takes its key)
    PERFORM identity_sync._claim_changes(greatest(batch_size / 10, 10));
    -- From here on plans are made for each execution: cached generic plans would be the ones
    -- made while the registry was small (a new target, the first batches of a resync), a
    -- sequential scan that is right for a hundred accounts and ruinous for a hundred thousand
    -- (bench/run saw batches go from 0.2 s to 18 s). For this transaction only: delivery keeps
    -- its cached plans.
    PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);
    PERFORM identity_sync._undefer(batch_size);
    PERFORM identity_sync._scratch('_is_batch', 'person_key text, target_id int, source_id int, op text, '
                                                'first_at timestamptz, change_ids bigint[]');
    IF mark ? 'at' AND full_at > clock_timestamp() - interval '1 second' THEN
        from_at := (mark->>'at')::timestamptz;
        from_key := mark->>'key';
        from_target := (mark->>'target')::int;
    END IF;
    claimed := 0;
    -- The claim's one good plan is the index in its order, whatever the statistics say: right
    -- after a resync or a bulk HR change marked 200,000 persons, before autovacuum has
    -- analyzed _dirty, the planner sorted every row left for each batch (100 ms a batch).
    PERFORM pg_catalog.set_config('enable_seqscan', 'off', true), pg_catalog.set_config('enable_bitmapscan', 'off', true),
            pg_catalog.set_config('enable_sort', 'off', true);
    LOOP
        -- The rows claimed are deleted by their ctid (they are locked, so it holds), never by a
        -- join: planned on statistics from when _dirty was empty (analyzed after a stream of
        -- HR changes had drained), the join of the claim with a resync's 200,000 dirty rows
        -- became a nested loop over all of them for each claimed row: 800 million comparisons,
        -- 104 s for one batch (auto_explain in bench/run, after its capture_oltp phase).
        WITH b AS (
            SELECT ctid FROM identity_sync._dirty
             WHERE held_by IS NULL   -- a reconcile run plans those itself (48_reconcile.sql)
               AND (first_at, person_key, target_id) > (from_at, from_key, from_target)
             ORDER BY first_at, person_key, target_id LIMIT batch_size - claimed FOR UPDATE SKIP LOCKED),
        d AS (
            DELETE FROM identity_sync._dirty x WHERE x.ctid = ANY (ARRAY(SELECT b.ctid FROM b))
            RETURNING x.person_key, x.target_id, x.source_id, x.op, x.first_at, x.change_ids)
        INSERT INTO pg_temp._is_batch SELECT * FROM d;
        GET DIAGNOSTICS more = ROW_COUNT;
        claimed := claimed + more;
        EXIT WHEN claimed >= batch_size OR from_at = '-infinity';
        -- less than a batch after the mark: from the head
        from_at := '-infinity';
        from_key := '';
        from_target := -1;
    END LOOP;
    PERFORM pg_catalog.set_config('enable_seqscan', seqscan, true), pg_catalog.set_config('enable_bitmapscan', bitmapscan, true),
            pg_catalog.set_config('enable_sort', sort, true);
    IF from_at = '-infinity' THEN
        full_at := clock_timestamp();
    END IF;
    PERFORM pg_catalog.set_config('identity_sync_plan.from',
        coalesce((SELECT jsonb_build_object('at', b.first_at, 'key', b.person_key, 'target', b.target_id, 'full_at', full_at)
                    FROM pg_temp._is_batch b ORDER BY b.first_at DESC, b.person_key DESC, b.target_id DESC LIMIT 1),
                 jsonb_build_object('full_at', full_at))::text, false);
    IF claimed = 0 THEN
        RETURN 0;
    END IF;
    SELECT array_agg(DISTINCT person_key) INTO all_keys FROM pg_temp._is_batch;
    INSERT INTO identity_sync.plan_run (persons, keys) VALUES (cardinality(all_keys), all_keys)
    RETURNING id INTO plan_id;
    PERFORM identity_sync._record_causes(plan_id);
    FOR t IN SELECT * FROM identity_sync.target WHERE compiled IS NOT NULL ORDER BY id LOOP
        SELECT array_agg(DISTINCT person_key) INTO keys FROM pg_temp._is_batch WHERE target_id IN (0, t.id);
        CONTINUE WHEN keys IS NULL;
        IF t.plan_retry_at > now() THEN
            -- failing, and its next attempt is not due: its persons wait for it
            PERFORM identity_sync._defer(t.id);
            CONTINUE;
        END IF;
        BEGIN
            n_events := n_events + identity_sync._plan_target(t, keys, plan_id);
        EXCEPTION WHEN query_canceled THEN
            -- (OTHERS does not catch a cancel: a timeout of our own is the target's failure,
            -- any other cancel stops the whole plan)
            IF NOT identity_sync._timed_out() THEN
                RAISE;
            END IF;
            PERFORM identity_sync._plan_failed(t, SQLERRM);
            CONTINUE;
        WHEN OTHERS THEN
            PERFORM identity_sync._plan_failed(t, SQLERRM);
            CONTINUE;
        END;
        IF t.plan_failed_at IS NOT NULL THEN
            UPDATE identity_sync.target
               SET plan_failures = 0, plan_failed_at = NULL, plan_error = NULL, plan_retry_at = NULL
             WHERE id = t.id;
            RAISE LOG 'identity_sync: target "%" is planned again', t.name;
        END IF;
    END LOOP;
    UPDATE identity_sync.plan_run SET events = n_events WHERE id = plan_id;
    RETURN claimed;
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

-- (and to the role user SQL runs as, identity_sync.run_as: mappings call it)
GRANT EXECUTE ON FUNCTION identity_sync.person_ref(anyelement) TO identity_sync_reader, identity_sync_evaluator;

COMMENT ON FUNCTION identity_sync.person_ref(anyelement) IS 'An attribute value referring to another person (e.g. manager): sent as that person''s account id in the target.';
