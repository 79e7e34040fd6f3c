-- Delivery, SQL side: claiming due events, recording outcomes in the registry, and applying
-- events to table targets. The worker (src/deliver/) calls these in short transactions of its
-- own; HTTP requests happen between them, outside any transaction.

-- The worker steps aside for DDL on the extension (src/deliver/txn.rs): each of its
-- transactions takes a share lock on the extension object without waiting, and gives up when
-- it is taken or asked for. DROP EXTENSION takes that lock itself before anything else;
-- ALTER EXTENSION (an update script ALTERs the tables the worker writes) takes it here, before
-- its script runs, and drop_target() calls _exclude_worker() first. The worker's transaction in
-- progress ends, the next one sees the lock and stays away until the DDL commits: no deadlock.
-- (The trigger fires for ALTER EXTENSION of any extension: a wait for one worker transaction.
-- An update script from a version that had no such trigger takes the lock itself, as its first
-- statement, once it has created _exclude_worker: SELECT identity_sync._exclude_worker();)
-- (SECURITY DEFINER: it fires for whoever alters any extension, and _exclude_worker is private)
CREATE FUNCTION identity_sync._exclude_worker_on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._exclude_worker();
END
$$;
CREATE EVENT TRIGGER identity_sync_exclude_worker ON ddl_command_start
    WHEN TAG IN ('ALTER EXTENSION')
    EXECUTE FUNCTION identity_sync._exclude_worker_on_ddl();

-- At worker start: events a crash left in flight are due again (at-least-once delivery).
-- Each such attempt is in the attempts history as interrupted.
CREATE FUNCTION identity_sync._worker_start() RETURNS int
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH r AS (
        UPDATE identity_sync.event SET state = 'retry', due_at = now(),
               last_error = coalesce(last_error, 'in flight when the worker stopped')
         WHERE state = 'sending' RETURNING id, attempts, sent_at),
    h AS (
        INSERT INTO identity_sync._attempt (event_id, attempt, sent_at, outcome, error)
        SELECT r.id, r.attempts, r.sent_at, 'interrupted', 'in flight when the worker stopped' FROM r)
    SELECT count(*)::int FROM r
$$;

-- Count outcomes per target for monitoring (_delivery_stats, view metrics): `delivered` events
-- done, `failed` attempts that did not deliver.
CREATE FUNCTION identity_sync._count_outcomes(target_id int, delivered bigint, failed bigint)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._delivery_stats AS s (target_id, delivered, failed_attempts, last_success, last_failure)
    VALUES (target_id, delivered, failed, CASE WHEN delivered > 0 THEN clock_timestamp() END,
            CASE WHEN failed > 0 THEN clock_timestamp() END)
    ON CONFLICT ON CONSTRAINT _delivery_stats_pkey DO UPDATE
       SET delivered = s.delivered + excluded.delivered,
           failed_attempts = s.failed_attempts + excluded.failed_attempts,
           last_success = coalesce(excluded.last_success, s.last_success),
           last_failure = coalesce(excluded.last_failure, s.last_failure)
$$;

-- The events of the last _apply_done (pg_temp._is_done), counted per target.
CREATE FUNCTION identity_sync._count_done() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._count_outcomes(d.target_id, count(*), 0)
       FROM pg_temp._is_done d GROUP BY d.target_id;
END
$$;

-- Replace {"$person": key} values by that person's account id in the same target.
CREATE FUNCTION identity_sync._resolve_refs(target_id int, attrs jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN attrs IS NULL OR NOT attrs::text LIKE '%"$person"%' THEN attrs ELSE
        (SELECT jsonb_object_agg(e.key,
                    CASE WHEN jsonb_typeof(e.value) = 'object' AND e.value ? '$person'
                         THEN to_jsonb((SELECT a.remote_id FROM identity_sync.account a
                                         WHERE a.target_id = _resolve_refs.target_id
                                           AND a.person_key = e.value->>'$person'
                                           AND a.state IN ('active', 'disabled')))
                         ELSE e.value END)
           FROM jsonb_each(attrs) AS e) END
$$;

-- Claim due events of the given target kinds: per person only the first unfinished event, so
-- that a person's events go out strictly in order and one at a time. Each target gets its share
-- of max_events, so a slow target cannot crowd out the others. Events a threshold holds wait as
-- 'held' (and so do their persons' later events) until an operator releases them, all or one
-- action's (release(target, kind)), or discards them; what was released goes meanwhile.
-- PL/pgSQL so that its plans are cached for the worker's session (a SQL function would be
-- planned on every call).
-- Where a target's claims start (_claim_from): the index event_due keeps an entry for every
-- event that was ever pending until VACUUM removes it, and while any transaction holds an old
-- snapshot (a report, a backup, a session waiting in wait_idle) nothing can remove the entries
-- of the events claimed since, not even the index scan itself (kill_prior_tuple). A claim that
-- started at the head of the queue walked all of them on every round: 20,000 heap visits a
-- claim after 16,000 deliveries (bench/run --profile), delivery going from thousands of events
-- a second to under a hundred. So each session remembers, per target, a time before which no
-- event can be due (the GUC identity_sync_claim.from, a jsonb {target id: timestamptz}, set by
-- _claim, transactional, lost with the session) and the claim scans from there:
--   * every event pending or retrying when the claim ended is due at or after it (the least
--     due_at among them, read after the claim), and
--   * an event made pending later is due at or after the start of the transaction that made
--     it so (every writer sets due_at from now() or later; _breaker's quarantine included),
--     so at or after the start of the oldest transaction of this database running when the
--     claim began: the mark is never later than that (pg_stat_activity, read first).
-- Without the rights to see every session's transaction (pg_read_all_stats), with
-- track_activities off or a prepared transaction in this database, there is no mark and the
-- claim scans from the head as before.
CREATE FUNCTION identity_sync._claim_horizon() RETURNS timestamptz
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
                     AND current_setting('track_activities')::boolean
                     AND NOT EXISTS (SELECT FROM pg_prepared_xacts x WHERE x.database = current_database())
                THEN (SELECT min(a.xact_start) FROM pg_stat_get_activity(NULL) AS a
                       WHERE a.datid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                         AND a.backend_type IS DISTINCT FROM 'autovacuum worker') END
$$;

CREATE FUNCTION identity_sync._claim_from(target_id int) RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((nullif(current_setting('identity_sync_claim.from', true), '')::jsonb ->> target_id::text)::timestamptz,
                    '-infinity')
$$;

-- Its plans are cached for the worker's lifetime, and may be made while the queue is empty (a
-- new target) or analyzed as empty (after a mass deletion); see the per-person order check.
-- (Pinning its access path with SET enable_seqscan/enable_bitmapscan = off on the function
-- was measured and dropped: latency p50 16-20 ms instead of 8, sending alone 10,759 instead of
-- 12,719 events/s in bench/run.)
CREATE FUNCTION identity_sync._claim(kinds text[], max_events int)
RETURNS TABLE (event_id bigint, target_id int, person_key text, kind text, payload jsonb,
               remote_id text, attempts int, created_at timestamptz)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    share int;
    eligible int[];
    thresholds boolean;
    -- before the claim's snapshot (see above)
    horizon timestamptz := identity_sync._claim_horizon();
    marks jsonb := coalesce(nullif(current_setting('identity_sync_claim.from', true), '')::jsonb, '{}');
BEGIN
    -- (nothing else is read when no target can be sent to: the worker claims on every tick,
    -- planning included)
    SELECT array_agg(t.id), bool_or(t.options ?| ARRAY['max_creates', 'max_disables', 'max_deletes'])
      INTO eligible, thresholds
      FROM identity_sync.target t
     WHERE t.kind = ANY (kinds) AND NOT t.paused
       AND (t.quarantined_at IS NULL OR t.probe_at <= now())
       AND NOT coalesce((t.options->>'dry_run')::boolean, false);
    -- A target with thresholds waits until planning has caught up, so that a threshold judges
    -- the whole change (a mass termination planned in several batches) before any of it goes.
    IF thresholds AND (EXISTS (SELECT FROM identity_sync._dirty) OR EXISTS (SELECT FROM identity_sync.change)) THEN
        eligible := ARRAY(SELECT t.id FROM identity_sync.target t
                           WHERE t.id = ANY (eligible) AND NOT t.options ?| ARRAY['max_creates', 'max_disables', 'max_deletes']);
    END IF;
    IF coalesce(cardinality(eligible), 0) = 0 THEN
        RETURN;
    END IF;
    share := greatest(1, ceil(max_events::numeric / cardinality(eligible)))::int;
    RETURN QUERY
    WITH c AS (
        SELECT e.id
          FROM identity_sync.target t
         CROSS JOIN LATERAL (
            SELECT e.id FROM identity_sync.event e
             WHERE e.target_id = t.id AND e.state IN ('pending', 'retry') AND e.due_at <= now()
               AND e.due_at >= identity_sync._claim_from(t.id)
               -- (a scalar subquery, not NOT EXISTS, which the planner may hash over the whole
               -- table: in bench/run right after a mass deletion a claim read 170,000 buffers,
               -- 237 ms, with a plan we could not see any more; the hash is one that would)
               AND (SELECT 1 FROM identity_sync.event p
                     WHERE p.target_id = e.target_id AND p.person_key = e.person_key
                       AND p.seq < e.seq AND p.state <> 'done' LIMIT 1) IS NULL
             ORDER BY e.due_at, e.seq
             -- a quarantined target gets one request, the probe
             LIMIT CASE WHEN t.quarantined_at IS NULL THEN share ELSE 1 END
               FOR UPDATE SKIP LOCKED) AS e
         WHERE t.id = ANY (eligible)),
    u AS (
        UPDATE identity_sync.event e
           SET state = 'sending', attempts = e.attempts + 1, sent_at = clock_timestamp()
          FROM c WHERE e.id = c.id
        RETURNING e.*),
    probing AS (
        -- the next probe waits for this one's answer (or its interval, should it get lost)
        UPDATE identity_sync.target t SET probe_at = now() + t.probe_interval
         WHERE t.quarantined_at IS NOT NULL AND t.id IN (SELECT u.target_id FROM u))
    SELECT u.id, u.target_id, u.person_key, u.kind,
           CASE WHEN u.payload::text LIKE '%"$person"%'
                THEN u.payload || jsonb_strip_nulls(jsonb_build_object(
                        'attributes', identity_sync._resolve_refs(u.target_id, u.payload->'attributes'),
                        'changed', identity_sync._resolve_refs(u.target_id, u.payload->'changed')))
                ELSE u.payload END,
           a.remote_id, u.attempts, u.created_at
      FROM u LEFT JOIN identity_sync.account a ON a.target_id = u.target_id AND a.person_key = u.person_key
     ORDER BY u.target_id, u.person_key, u.seq;
    -- The new marks: the least due_at still pending or retrying (what this claim left, events
    -- behind one in flight included), never later than the horizon read before the claim.
    IF horizon IS NULL THEN
        marks := '{}';
    ELSE
        marks := marks || coalesce((
            SELECT jsonb_object_agg(t.id::text, least(horizon, (
                       SELECT min(e.due_at) FROM identity_sync.event e
                        WHERE e.target_id = t.id AND e.state IN ('pending', 'retry')
                          AND e.due_at >= identity_sync._claim_from(t.id))))
              FROM unnest(eligible) AS t(id)), '{}');
    END IF;
    PERFORM pg_catalog.set_config('identity_sync_claim.from', marks::text, false);
END
$$;

-- The circuit breaker (Entra's quarantine): a target whose every request has failed for
-- quarantine_after (default 1 minute, at least 5 requests in a row) for target-level reasons
-- (what says the target, not one person's data, is wrong: see _record) is quarantined: it gets
-- one request at a time, a probe, at growing intervals (30 s doubling to 30 min), its failed
-- events wait for it instead of an operator, and the first success ends it (_breaker_closed).
-- A flaky target, whose failures are mixed with successes, is never quarantined. True when the
-- target is quarantined now.
CREATE FUNCTION identity_sync._breaker(e identity_sync.event, error text, target_level boolean)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
BEGIN
    IF NOT target_level THEN
        RETURN (SELECT x.quarantined_at IS NOT NULL FROM identity_sync.target x WHERE x.id = e.target_id);
    END IF;
    UPDATE identity_sync.target x
       SET failure_streak = x.failure_streak + 1,
           failing_since = coalesce(x.failing_since, e.sent_at)
     WHERE x.id = e.target_id
    RETURNING * INTO t;
    IF t.quarantined_at IS NOT NULL THEN
        IF e.sent_at >= t.quarantined_at THEN
            -- a probe failed (not a request sent before the quarantine): wait longer
            UPDATE identity_sync.target x
               SET probe_interval = least(x.probe_interval * 2, interval '30 minutes'),
                   probe_at = now() + least(x.probe_interval * 2, interval '30 minutes'),
                   quarantine_reason = error
             WHERE x.id = t.id;
        END IF;
        RETURN true;
    END IF;
    IF t.failure_streak < 5
       OR now() - t.failing_since < coalesce((t.options->>'quarantine_after')::interval, interval '1 minute') THEN
        RETURN false;
    END IF;
    UPDATE identity_sync.target x
       SET quarantined_at = now(), quarantine_reason = error,
           probe_interval = interval '30 seconds', probe_at = now() + interval '30 seconds'
     WHERE x.id = t.id;
    -- What failed for good during the streak was the target's fault: it waits for the target.
    UPDATE identity_sync.event x SET state = 'retry', due_at = now() + interval '30 seconds'
     WHERE x.target_id = t.id AND x.state = 'failed' AND x.sent_at >= t.failing_since;
    PERFORM identity_sync._audit('quarantine', t.name, NULL,
                                 jsonb_build_object('failures', t.failure_streak, 'since', t.failing_since,
                                                    'reason', error));
    PERFORM identity_sync._notify_target('target_quarantined', t.id, format('quarantine %s %s', t.id, now()),
                                         jsonb_build_object('failures', t.failure_streak, 'since', t.failing_since,
                                                            'reason', error));
    RETURN true;
END
$$;

-- A delivery succeeded for these targets: the streak is over, and so is a quarantine (its
-- waiting events go at once).
CREATE FUNCTION identity_sync._breaker_closed(target_ids int[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
BEGIN
    FOR t IN UPDATE identity_sync.target x
                SET failure_streak = 0, failing_since = NULL, quarantined_at = NULL,
                    quarantine_reason = NULL, probe_at = NULL, probe_interval = NULL
               FROM identity_sync.target old
              WHERE x.id = ANY (target_ids) AND old.id = x.id
                AND (x.failure_streak > 0 OR x.quarantined_at IS NOT NULL)
             RETURNING old.* LOOP
        IF t.quarantined_at IS NOT NULL THEN
            UPDATE identity_sync.event SET due_at = now() WHERE target_id = t.id AND state = 'retry';
            PERFORM identity_sync._audit('quarantine_end', t.name, NULL,
                                         jsonb_build_object('quarantined_for', now() - t.quarantined_at));
            PERFORM identity_sync._wake_at_commit();
        END IF;
    END LOOP;
END
$$;

-- Record one outcome. outcome: done | retry | failed | conflict.
CREATE FUNCTION identity_sync._record(event_id bigint, outcome text, remote_id text DEFAULT NULL,
                                      error text DEFAULT NULL, http_status int DEFAULT NULL,
                                      retry_in interval DEFAULT NULL, target_level boolean DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e identity_sync.event;
    max_attempts int := identity_sync._max_attempts();
BEGIN
    SELECT * INTO e FROM identity_sync.event WHERE id = event_id;
    IF e.id IS NULL OR e.state <> 'sending' THEN
        RETURN;   -- skipped or discarded by an operator meanwhile
    END IF;
    -- Target-level failures feed the circuit breaker: a transient one without a status (no
    -- answer) or with 408, 429 or 5xx, and a refusal of our credentials (401, 403, 407).
    target_level := coalesce(target_level, CASE outcome
        WHEN 'retry' THEN _record.http_status IS NULL OR _record.http_status IN (408, 429) OR _record.http_status >= 500
        WHEN 'failed' THEN _record.http_status IN (401, 403, 407)
        ELSE false END);
    IF outcome = 'failed' AND target_level THEN
        -- Our credentials were refused: that is the target's answer to every event, not a verdict
        -- on this one; retry with backoff (and let the breaker judge the target).
        outcome := 'retry';
        retry_in := coalesce(retry_in, identity_sync._retry_delay(e.attempts));
    END IF;
    -- An attempt that did not deliver joins the history (the event keeps only its last one).
    IF outcome <> 'done' THEN
        INSERT INTO identity_sync._attempt (event_id, attempt, sent_at, outcome, http_status, error)
        VALUES (e.id, e.attempts, e.sent_at, outcome, _record.http_status, error);
        PERFORM identity_sync._count_outcomes(e.target_id, 0, 1);
    END IF;
    IF outcome = 'retry' AND identity_sync._breaker(e, error, target_level) THEN
        -- The target is quarantined: this event waits for the target, not for an operator.
        UPDATE identity_sync.event SET state = 'retry', last_error = error, http_status = _record.http_status,
               -- (never before now: _claim_from)
               due_at = (SELECT greatest(t.probe_at, now()) FROM identity_sync.target t WHERE t.id = e.target_id)
         WHERE id = e.id;
    ELSIF outcome = 'done' THEN
        PERFORM identity_sync._apply_done(ARRAY[e.id], ARRAY[_record.remote_id], ARRAY[_record.http_status]);
        PERFORM identity_sync._count_done();
    ELSIF outcome = 'retry' AND e.attempts < max_attempts THEN
        UPDATE identity_sync.event SET state = 'retry', last_error = error, http_status = _record.http_status,
               due_at = clock_timestamp() + coalesce(retry_in, interval '1 second') WHERE id = e.id;
    ELSIF outcome = 'conflict' THEN
        e.http_status := _record.http_status;
        PERFORM identity_sync._uniqueness_conflict(e, error);
    ELSE
        UPDATE identity_sync.event SET state = 'failed', http_status = _record.http_status,
               last_error = CASE WHEN outcome = 'retry' THEN format('gave up after %s attempts: %s', e.attempts, error) ELSE error END
         WHERE id = e.id;
    END IF;
END
$$;

-- One delivery outcome as the worker reports it (src/deliver/ledger.rs). outcome: done | retry
-- | failed | conflict; retry_in_ms: the backoff the worker chose for a retry.
CREATE TYPE identity_sync._outcome AS (event_id bigint, outcome text, remote_id text, error text,
                                       http_status int, retry_in_ms bigint);

-- Record a round of outcomes at once (what the worker does): the delivered ones set-based, the
-- others one by one.
CREATE FUNCTION identity_sync._record_many(outcomes identity_sync._outcome[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o identity_sync._outcome;
BEGIN
    PERFORM identity_sync._apply_done(
        ARRAY(SELECT x.event_id FROM unnest(outcomes) AS x WHERE x.outcome = 'done' ORDER BY x.event_id),
        ARRAY(SELECT x.remote_id FROM unnest(outcomes) AS x WHERE x.outcome = 'done' ORDER BY x.event_id),
        ARRAY(SELECT x.http_status FROM unnest(outcomes) AS x WHERE x.outcome = 'done' ORDER BY x.event_id));
    PERFORM identity_sync._count_done();
    FOR o IN SELECT * FROM unnest(outcomes) AS x WHERE x.outcome <> 'done' LOOP
        PERFORM identity_sync._record(o.event_id, o.outcome, o.remote_id, o.error, o.http_status,
                                      make_interval(secs => o.retry_in_ms / 1000.0));
    END LOOP;
END
$$;

-- The target said a unique value is taken (SCIM 409 uniqueness, a table's unique_violation) by
-- an account we do not manage: remember the value as taken, and plan the person again, so that
-- the next iteration is tried. `taken`: the unique attributes whose values are taken (NULL: every
-- unique attribute the event sends, for a target that does not say which). The event and the
-- person's later ones are closed as done with the reason (trace shows them); the registry goes
-- back to what the target has: no account for a create, the applied state for an update.
CREATE FUNCTION identity_sync._uniqueness_conflict(e identity_sync.event, error text, taken text[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sent jsonb := CASE e.kind WHEN 'create' THEN e.payload->'attributes' ELSE e.payload->'changed' END;
BEGIN
    INSERT INTO identity_sync._unique (target_id, attribute, value, person_key)
    SELECT e.target_id, m.attribute, sent->>m.attribute, NULL
      FROM identity_sync.mapping m
     WHERE m.target_id = e.target_id AND m.is_unique AND sent->>m.attribute IS NOT NULL
       AND (taken IS NULL OR m.attribute = ANY (taken))
    ON CONFLICT (target_id, attribute, value) DO UPDATE SET person_key = NULL;
    UPDATE identity_sync.event x
       SET state = 'done', done_at = clock_timestamp(),
           http_status = CASE WHEN x.id = e.id THEN e.http_status END,
           last_error = CASE WHEN x.id = e.id THEN error || ' (value taken: planned again with the next iteration)'
                             ELSE format('planned again after a unique value was taken (event %s)', e.id) END
     WHERE x.target_id = e.target_id AND x.person_key = e.person_key AND x.state <> 'done';
    UPDATE identity_sync.account a
       SET planned_state = CASE WHEN a.state = 'pending' THEN 'deleted' ELSE a.state END,
           planned_attributes = CASE WHEN a.state = 'pending' THEN '{}' ELSE a.attributes END,
           planned_groups = CASE WHEN a.state = 'pending' THEN '{}' ELSE a.groups END
     WHERE a.target_id = e.target_id AND a.person_key = e.person_key;
    INSERT INTO identity_sync._dirty (person_key, target_id, op, first_at)
    VALUES (e.person_key, e.target_id, 'conflict', now()) ON CONFLICT DO NOTHING;
    RAISE LOG 'identity_sync: unique value taken in the target for person %: %', e.person_key, error;
END
$$;

-- A table target refused an event with unique_violation: the unique attributes (is_unique) it
-- sends whose values another row of the relation holds. Empty when the violation is about
-- something else (then the event fails as any constraint violation does).
CREATE FUNCTION identity_sync._table_values_taken(t identity_sync.target, e identity_sync.event)
RETURNS text[] LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := (t.options->>'relation')::regclass;
    keycol text := t.options->>'key_column';
    keytype text := format_type((SELECT atttypid FROM pg_attribute WHERE attrelid = rel AND attname = keycol), NULL);
    sent jsonb := CASE e.kind WHEN 'create' THEN e.payload->'attributes' ELSE e.payload->'changed' END;
    m record;
    taken text[] := '{}';
    found boolean;
BEGIN
    FOR m IN SELECT mp.attribute FROM identity_sync.mapping mp
              WHERE mp.target_id = t.id AND mp.is_unique AND sent->>mp.attribute IS NOT NULL LOOP
        EXECUTE format('SELECT EXISTS (SELECT FROM %s AS x, jsonb_populate_record(NULL::%s, $1) AS r '
                       'WHERE x.%I = r.%I AND x.%I IS DISTINCT FROM $2::%s)',
                       rel, rel, m.attribute, m.attribute, keycol, keytype)
          INTO found USING sent, e.person_key;
        IF found THEN
            taken := taken || m.attribute;
        END IF;
    END LOOP;
    RETURN taken;
END
$$;

-- Apply one event to a table target (local table or postgres_fdw foreign table).
CREATE FUNCTION identity_sync._apply_table_event(t identity_sync.target, e record)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := (t.options->>'relation')::regclass;
    keycol text := t.options->>'key_column';
    activecol text := t.options->>'active_column';
    groups_rel regclass := (t.options->>'groups_relation')::regclass;
    groupcol text := coalesce(t.options->>'group_column', 'group_name');
    keytype text := format_type((SELECT atttypid FROM pg_attribute WHERE attrelid = rel AND attname = keycol), NULL);
    attrs jsonb;
    sets text;
    n int;
    -- The row's key: the person's, or for an orphan found by reconcile, the key it was found under.
    key text := coalesce(e.remote_id, e.person_key);
BEGIN
    IF e.kind IN ('create', 'update') THEN
        attrs := CASE e.kind WHEN 'create' THEN e.payload->'attributes' ELSE e.payload->'changed' END;
        IF activecol IS NOT NULL AND e.kind = 'create' THEN
            attrs := attrs || jsonb_build_object(activecol, (e.payload->>'active')::boolean);
        END IF;
        -- Values convert to the columns' types through the table's own row type.
        SELECT string_agg(format('%I = r.%I', k, k), ', ') INTO sets FROM jsonb_object_keys(attrs) AS k;
        IF sets IS NOT NULL THEN
            EXECUTE format('UPDATE %s AS x SET %s FROM jsonb_populate_record(NULL::%s, $1) AS r WHERE x.%I = $2::%s',
                           rel, sets, rel, keycol, keytype) USING attrs, key;
            GET DIAGNOSTICS n = ROW_COUNT;
        ELSE
            n := 1;
        END IF;
        IF n = 0 THEN
            attrs := (e.payload->'attributes') || jsonb_build_object(keycol, e.person_key)
                     || CASE WHEN activecol IS NOT NULL
                             THEN jsonb_build_object(activecol, coalesce((e.payload->>'active')::boolean, true))
                             ELSE '{}' END;
            SELECT string_agg(quote_ident(k), ', '), string_agg(format('r.%I', k), ', ')
              INTO sets, keytype FROM jsonb_object_keys(attrs) AS k;
            EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM jsonb_populate_record(NULL::%s, $1) AS r',
                           rel, sets, keytype, rel) USING attrs;
        END IF;
    ELSIF e.kind IN ('enable', 'disable') THEN
        IF activecol IS NOT NULL THEN
            EXECUTE format('UPDATE %s SET %I = $1 WHERE %I = $2::%s', rel, activecol, keycol, keytype)
              USING e.kind = 'enable', key;
        END IF;
    ELSIF e.kind = 'delete' THEN
        EXECUTE format('DELETE FROM %s WHERE %I = $1::%s', rel, keycol, keytype) USING key;
        IF groups_rel IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s WHERE %I = $1::%s', groups_rel, keycol, keytype) USING key;
        END IF;
    ELSIF e.kind = 'grant' AND groups_rel IS NOT NULL THEN
        -- (no ON CONFLICT: the membership table needs no unique index, and a foreign table
        -- could not use one)
        EXECUTE format('INSERT INTO %1$s (%2$I, %3$I) SELECT $1::%4$s, $2 '
                       'WHERE NOT EXISTS (SELECT FROM %1$s WHERE %2$I = $1::%4$s AND %3$I = $2)',
                       groups_rel, keycol, groupcol, keytype) USING key, e.payload->>'group';
    ELSIF e.kind = 'revoke' AND groups_rel IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s WHERE %I = $1::%s AND %I = $2', groups_rel, keycol, keytype, groupcol)
          USING key, e.payload->>'group';
    END IF;
    -- grant / revoke without groups_relation: memberships are recorded in the registry only.
END
$$;

-- Deliver due events of table targets; returns how many were handled.
CREATE FUNCTION identity_sync._deliver_tables(max_events int)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e record;
    ev identity_sync.event;
    taken text[];
    t identity_sync.target;
    done identity_sync._outcome[] := '{}';
    n int := 0;
BEGIN
    IF NOT EXISTS (SELECT FROM identity_sync.target WHERE kind = 'table') THEN
        RETURN 0;
    END IF;
    FOR e IN SELECT * FROM identity_sync._claim(ARRAY['table'], max_events) LOOP
        IF t.id IS DISTINCT FROM e.target_id THEN
            SELECT * INTO t FROM identity_sync.target WHERE id = e.target_id;
        END IF;
        BEGIN
            PERFORM identity_sync._apply_table_event(t, e);
            done := done || ROW(e.event_id, 'done', e.person_key, NULL, NULL, NULL)::identity_sync._outcome;
        EXCEPTION WHEN unique_violation THEN
            -- A unique attribute's value is taken by a row we do not manage: plan the person
            -- again with the next iteration (as a SCIM 409 uniqueness does). Another unique
            -- constraint fails the event.
            SELECT * INTO ev FROM identity_sync.event x WHERE x.id = e.event_id;
            taken := CASE WHEN e.kind IN ('create', 'update') THEN identity_sync._table_values_taken(t, ev) END;
            IF cardinality(taken) > 0 THEN
                PERFORM identity_sync._uniqueness_conflict(ev, SQLERRM, taken);
            ELSE
                PERFORM identity_sync._record(e.event_id, 'failed', NULL, SQLERRM, NULL, NULL, false);
            END IF;
        WHEN OTHERS THEN
            -- A connection failure (a postgres_fdw table's server is down), deadlock,
            -- serialization failure, shutdown or lack of resources passes: retry with the backoff
            -- HTTP targets use (core's retry policy). Anything else (constraint, type) needs an
            -- operator.
            IF identity_sync._is_transient_sqlstate(SQLSTATE) THEN
                PERFORM identity_sync._record(e.event_id, 'retry', NULL, SQLERRM, NULL,
                                              identity_sync._retry_delay(e.attempts), true);
            ELSE
                PERFORM identity_sync._record(e.event_id, 'failed', NULL, SQLERRM, NULL, NULL, false);
            END IF;
        END;
        n := n + 1;
    END LOOP;
    -- What was written is recorded as one round, as the HTTP targets' are (_record_many): one
    -- registry update for the round, not one per event (a claim holds one event per person).
    IF cardinality(done) > 0 THEN
        PERFORM identity_sync._record_many(done);
    END IF;
    RETURN n;
END
$$;
