-- Status and operations: what psql users look at, and the levers operators pull.

CREATE VIEW identity_sync.accounts AS
SELECT t.name AS target, a.person_key, a.remote_id, a.state, a.planned_state,
       a.attributes, a.groups, a.planned_attributes, a.planned_groups,
       a.created_at, a.planned_at, a.applied_at, a.orphan
  FROM identity_sync.account a JOIN identity_sync.target t ON t.id = a.target_id;

CREATE VIEW identity_sync.events AS
SELECT e.id, t.name AS target, e.person_key, e.seq, e.kind, e.state, e.payload, e.attempts,
       e.due_at, e.last_error, e.http_status, e.plan_id, e.created_at, e.sent_at, e.done_at,
       e.done_at - e.created_at AS latency
  FROM identity_sync.event e JOIN identity_sync.target t ON t.id = e.target_id;

CREATE VIEW identity_sync.audit_log AS
SELECT id, at, actor, action, object, old, new FROM identity_sync._audit;

CREATE VIEW identity_sync.status AS
SELECT t.name AS target, t.kind,
       CASE WHEN t.paused THEN 'paused'
            WHEN t.quarantined_at IS NOT NULL THEN 'quarantined'
            WHEN t.held IS NOT NULL THEN 'held'
            WHEN t.plan_failed_at IS NOT NULL
              OR EXISTS (SELECT FROM identity_sync._plan_error pe WHERE pe.target_id = t.id)
              OR EXISTS (SELECT FROM identity_sync.event e WHERE e.target_id = t.id AND e.state = 'failed')
              OR EXISTS (SELECT FROM identity_sync.event e WHERE e.target_id = t.id AND e.state = 'retry' AND e.attempts > 1)
            THEN 'failing'
            ELSE 'active' END AS state,
       t.held->>'threshold' AS held_by,
       CASE WHEN t.held IS NOT NULL
            THEN format('%s %s events planned within the hour; %s = %s allows %s', t.held->>'planned', t.held->>'kind', t.held->>'threshold', t.held->>'limit', t.held->>'allowed') END AS held_detail,
       coalesce(a.active, 0) AS accounts_active, coalesce(a.disabled, 0) AS accounts_disabled,
       coalesce(a.pending, 0) AS accounts_pending, coalesce(a.deleted, 0) AS accounts_deleted,
       coalesce(e.pending, 0) AS events_pending, coalesce(e.sending, 0) AS events_sending,
       coalesce(e.retrying, 0) AS events_retrying, coalesce(e.failed, 0) AS events_failed,
       coalesce(e.held, 0) AS events_held,
       now() - e.oldest_pending AS oldest_pending_age,
       e.last_success,
       -- planning the target failed (which expression and why), else the last event's error,
       -- else the last person who could not be planned
       coalesce('planning: ' || t.plan_error, e.last_error,
                (SELECT format('person %s: %s', pe.person_key, pe.message) FROM identity_sync._plan_error pe
                  WHERE pe.target_id = t.id ORDER BY pe.at DESC LIMIT 1)) AS last_error,
       coalesce(e.delivered_last_hour, 0) AS delivered_last_hour,
       (SELECT count(*) FROM identity_sync._plan_error pe WHERE pe.target_id = t.id) AS plan_errors,
       CASE WHEN t.resync_total IS NOT NULL THEN
            format('%s of %s persons planned', t.resync_total - (SELECT count(*) FROM identity_sync._dirty d WHERE d.target_id IN (0, t.id))
                                                               - (SELECT count(*) FROM identity_sync._deferred d WHERE d.target_id = t.id), t.resync_total)
       END AS resync_progress,
       coalesce((t.options->>'dry_run')::boolean, false) AS dry_run,
       identity_sync._reconcile_progress(t.id) AS reconcile_progress,
       (SELECT max(r.finished_at) FROM identity_sync.reconcile_run r WHERE r.target_id = t.id AND r.state = 'done') AS last_reconcile,
       t.quarantined_at AS quarantined_since, t.quarantine_reason, t.probe_at AS next_probe,
       t.plan_failed_at AS plan_failing_since, t.plan_retry_at AS next_plan_attempt,
       -- notices about this target (55_notify.sql) not sent yet, and given up
       (SELECT count(*) FROM identity_sync.notice x WHERE x.target_id = t.id AND x.state IN ('pending', 'sending', 'retry')) AS notices_pending,
       (SELECT count(*) FROM identity_sync.notice x WHERE x.target_id = t.id AND x.state = 'failed') AS notices_failed
  FROM identity_sync.target t
  LEFT JOIN LATERAL (
     SELECT count(*) FILTER (WHERE state = 'active') AS active,
            count(*) FILTER (WHERE state = 'disabled') AS disabled,
            count(*) FILTER (WHERE state = 'pending') AS pending,
            count(*) FILTER (WHERE state = 'deleted') AS deleted
       FROM identity_sync.account WHERE target_id = t.id) AS a ON true
  LEFT JOIN LATERAL (
     SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
            count(*) FILTER (WHERE state = 'sending') AS sending,
            count(*) FILTER (WHERE state = 'retry') AS retrying,
            count(*) FILTER (WHERE state = 'failed') AS failed,
            count(*) FILTER (WHERE state = 'held') AS held,
            min(created_at) FILTER (WHERE state IN ('pending', 'retry', 'held')) AS oldest_pending,
            (SELECT max(done_at) FROM identity_sync.event x WHERE x.target_id = t.id AND x.state = 'done') AS last_success,
            (SELECT x.last_error FROM identity_sync.event x WHERE x.target_id = t.id AND x.last_error IS NOT NULL
              ORDER BY x.sent_at DESC NULLS LAST LIMIT 1) AS last_error,
            (SELECT count(*) FROM identity_sync.event x WHERE x.target_id = t.id AND x.state = 'done'
                AND x.done_at > now() - interval '1 hour') AS delivered_last_hour
       FROM identity_sync.event WHERE target_id = t.id AND state <> 'done') AS e ON true;

-- Stop (pause) or restart (resume) delivery to a target; planning goes on either way.
CREATE FUNCTION identity_sync._set_paused(target text, paused boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE identity_sync.target t SET paused = _set_paused.paused
     WHERE t.id = (identity_sync._target(_set_paused.target)).id;
    PERFORM identity_sync._audit(CASE WHEN paused THEN 'pause' ELSE 'resume' END, target, NULL, NULL);
    IF NOT paused THEN
        PERFORM identity_sync._wake_at_commit();
    END IF;
END
$$;

CREATE FUNCTION identity_sync.pause(target text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._set_paused(target, true)
$$;

CREATE FUNCTION identity_sync.resume(target text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._set_paused(target, false)
$$;

-- The target `name`, which a threshold holds: release() and discard() decide about held events.
CREATE FUNCTION identity_sync._held_target(name text) RETURNS identity_sync.target
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(name);
BEGIN
    IF t.held IS NULL THEN
        RAISE EXCEPTION 'target "%" is not held', name USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN t;
END
$$;

-- An operator decided about a held target (action: release or discard; detail: how many events,
-- and so on, for the audit log): it is held no more, and its thresholds count from now on.
CREATE FUNCTION identity_sync._end_hold(t identity_sync.target, action text, detail jsonb) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE identity_sync.target SET held = NULL, released_at = now() WHERE id = t.id;
    SELECT identity_sync._audit(action, t.name, t.held, detail);
$$;

-- Let the events a threshold held go out: all of them, or one action's (kind: create, disable,
-- delete, ...). A person's events go in order, so releasing a kind releases the whole held
-- queue of each person who has a held event of that kind (a create with the grants after it);
-- the other persons' events stay held, and the target with them, now held by the threshold
-- those events exceed (if any; else by the one that held it).
CREATE FUNCTION identity_sync.release(target text, kind text DEFAULT NULL) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._held_target(target);
    n int;
    released bigint[];
    remaining jsonb;
BEGIN
    IF kind IS NOT NULL AND kind NOT IN ('create', 'update', 'enable', 'disable', 'delete', 'grant', 'revoke') THEN
        RAISE EXCEPTION 'invalid event kind "%"', kind USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The kinds are create, update, enable, disable, delete, grant and revoke; NULL releases every held event.';
    END IF;
    WITH r AS (
        UPDATE identity_sync.event e SET state = 'pending', due_at = now()
         WHERE e.target_id = t.id AND e.state = 'held'
           AND (release.kind IS NULL
                OR e.person_key IN (SELECT h.person_key FROM identity_sync.event h
                                     WHERE h.target_id = t.id AND h.state = 'held' AND h.kind = release.kind))
        RETURNING e.id)
    SELECT count(*), array_agg(r.id) INTO n, released FROM r;
    SELECT jsonb_object_agg(k, c) INTO remaining
      FROM (SELECT e.kind AS k, count(*) AS c FROM identity_sync.event e
             WHERE e.target_id = t.id AND e.state = 'held' GROUP BY 1) AS q;
    IF remaining IS NULL THEN
        PERFORM identity_sync._end_hold(t, 'release', jsonb_strip_nulls(jsonb_build_object('events', n, 'kind', kind)));
    ELSE
        -- Still held: by what the events left exceed (the threshold window goes on).
        UPDATE identity_sync.target x SET held = coalesce(identity_sync._check_thresholds(t, remaining), t.held)
         WHERE x.id = t.id;
        PERFORM identity_sync._audit('release', t.name, t.held,
                                     jsonb_build_object('events', n, 'kind', kind, 'still_held', remaining));
    END IF;
    IF coalesce((t.options->>'dry_run')::boolean, false) THEN
        PERFORM identity_sync._complete_dry_run(t.id);
    END IF;
    -- The released events' own notices go now (55_notify.sql).
    PERFORM identity_sync._release_notices(t.id, released);
    PERFORM identity_sync._wake_at_commit();
    RETURN n;
END
$$;

-- Drop the events a threshold held; their persons are planned again on their next change or
-- resync.
CREATE FUNCTION identity_sync.discard(target text) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._held_target(target);
    n int;
BEGIN
    WITH d AS (DELETE FROM identity_sync.event WHERE target_id = t.id AND state = 'held' RETURNING person_key)
    SELECT count(*) INTO n FROM d;
    -- The registry forgets what was planned and keeps what was applied.
    DELETE FROM identity_sync.account WHERE target_id = t.id AND remote_id IS NULL AND state = 'pending'
       AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.target_id = t.id AND e.person_key = account.person_key);
    UPDATE identity_sync.account a
       SET planned_state = a.state, planned_attributes = a.attributes, planned_groups = a.groups,
           seq = coalesce((SELECT max(seq) FROM identity_sync.event e WHERE e.target_id = t.id AND e.person_key = a.person_key), a.seq)
     WHERE a.target_id = t.id AND a.state <> 'pending'
       AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.target_id = t.id AND e.person_key = a.person_key AND e.state <> 'done');
    PERFORM identity_sync._release_notices(t.id, '{}');   -- (the discarded events' notices go)
    PERFORM identity_sync._end_hold(t, 'discard', jsonb_build_object('events', n));
    RETURN n;
END
$$;

-- Retry failed events: of a whole target (by name) or one event (by id).
CREATE FUNCTION identity_sync.retry(target_or_event text) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    IF target_or_event ~ '^\d+$' AND NOT EXISTS (SELECT FROM identity_sync.target WHERE name = target_or_event) THEN
        UPDATE identity_sync.event SET state = 'pending', attempts = 0, due_at = now()
         WHERE id = target_or_event::bigint AND state IN ('failed', 'retry');
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            RAISE EXCEPTION 'event % is not failed or retrying', target_or_event USING ERRCODE = 'object_not_in_prerequisite_state',
                DETAIL = coalesce('It is ' || (SELECT state FROM identity_sync.event WHERE id = target_or_event::bigint) || '.',
                                  'It does not exist.');
        END IF;
    ELSE
        UPDATE identity_sync.event SET state = 'pending', attempts = 0, due_at = now()
         WHERE target_id = (identity_sync._target(target_or_event)).id AND state IN ('failed', 'retry');
        GET DIAGNOSTICS n = ROW_COUNT;
        -- A quarantined target is probed now (one request; its answer ends the quarantine or not).
        UPDATE identity_sync.target SET probe_at = now()
         WHERE id = (identity_sync._target(target_or_event)).id AND quarantined_at IS NOT NULL;
        -- A target whose planning failed is planned again now (30_plan/60_plan.sql).
        UPDATE identity_sync.target SET plan_retry_at = now()
         WHERE id = (identity_sync._target(target_or_event)).id AND plan_failed_at IS NOT NULL;
    END IF;
    PERFORM identity_sync._audit('retry', target_or_event, NULL, jsonb_build_object('events', n));
    PERFORM identity_sync._wake_at_commit();
    RETURN n;
END
$$;

-- Give up on one failed event; the person's later events go on. The registry keeps the applied
-- state for what was skipped, so the next change of that person plans it again.
CREATE FUNCTION identity_sync.skip(event_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e identity_sync.event;
BEGIN
    SELECT * INTO e FROM identity_sync.event WHERE id = event_id;
    IF e.id IS NULL OR e.state NOT IN ('failed', 'retry', 'held', 'pending') THEN
        RAISE EXCEPTION 'event % cannot be skipped', event_id USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = CASE WHEN e.id IS NULL THEN 'It does not exist.' ELSE format('It is %s.', e.state) END;
    END IF;
    UPDATE identity_sync.event SET state = 'done', done_at = clock_timestamp(),
           last_error = coalesce(last_error, '') || ' (skipped by ' || session_user || ')'
     WHERE id = event_id;
    IF e.kind = 'create' THEN
        -- Nothing exists in the target, so the person's later events cannot go on either;
        -- forget the account so that the next plan creates it again.
        UPDATE identity_sync.event x SET state = 'done', done_at = clock_timestamp(),
               last_error = 'skipped with its create (event ' || e.id || ')'
         WHERE x.target_id = e.target_id AND x.person_key = e.person_key AND x.seq > e.seq AND x.state <> 'done';
        UPDATE identity_sync.account SET planned_state = 'deleted', planned_attributes = '{}', planned_groups = '{}'
         WHERE target_id = e.target_id AND person_key = e.person_key AND remote_id IS NULL;
    ELSIF NOT EXISTS (SELECT FROM identity_sync.event x
                       WHERE x.target_id = e.target_id AND x.person_key = e.person_key AND x.state <> 'done') THEN
        -- What was skipped is not in the target: plan from what is applied, so the person's
        -- next change (or a resync) plans it again.
        UPDATE identity_sync.account SET planned_state = state, planned_attributes = attributes, planned_groups = groups
         WHERE target_id = e.target_id AND person_key = e.person_key AND state <> 'pending';
    END IF;
    PERFORM identity_sync._audit('skip', event_id::text, to_jsonb(e) - 'payload', NULL);
    PERFORM identity_sync._wake_at_commit();
END
$$;

-- Full reconcile of every person for one target, in the worker's batches.
CREATE FUNCTION identity_sync.resync(target text) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    n int;
    adopt bigint;
BEGIN
    -- The first sync of a target that correlates (or one told to adopt) reads the target
    -- first and links the accounts already there: the persons wait for that run, which then
    -- plans them itself (48_reconcile.sql).
    IF t.kind <> 'webhook' AND t.compiled IS NOT NULL AND (coalesce((t.options->>'adopt')::boolean, false)
                                OR (t.options->>'correlate_on' IS NOT NULL
                                    AND NOT EXISTS (SELECT FROM identity_sync.account a
                                                     WHERE a.target_id = t.id AND a.planned_state <> 'deleted'))) THEN
        adopt := identity_sync._reconcile_queue(t.id, 'adopt', session_user::text, false);
        IF adopt IS NULL THEN
            RAISE EXCEPTION 'a reconcile of target "%" is running, so its accounts cannot be adopted now', t.name
                USING ERRCODE = 'object_in_use', HINT = 'Run resync() again when it has finished (identity_sync.reconcile_run).';
        END IF;
    END IF;
    INSERT INTO identity_sync._dirty AS d (person_key, target_id, op, first_at, held_by)
    SELECT k, t.id, 'resync', now(), adopt FROM unnest(identity_sync._all_person_keys()) AS k
    ON CONFLICT (person_key, target_id) DO UPDATE SET held_by = excluded.held_by WHERE excluded.held_by IS NOT NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE identity_sync.target SET resync_total = n, resync_started_at = now() WHERE id = t.id;
    PERFORM identity_sync._audit('resync', target, NULL, jsonb_build_object('persons', n, 'adopt_run', adopt));
    PERFORM identity_sync._wake_at_commit();
    RETURN n;
END
$$;

-- Provision one person now (Entra's "provision on demand"), what a helpdesk runs after fixing
-- HR data: plan the person in one target or in every target, in this transaction, exactly as
-- the worker would (thresholds, dry run, order), and return the events written. The worker
-- sends them as soon as this transaction commits.
CREATE FUNCTION identity_sync.sync_person(person_key text, target text DEFAULT NULL)
RETURNS SETOF identity_sync.events
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    only_id int;
    t identity_sync.target;
    pid bigint;
    n int := 0;
    known boolean;
BEGIN
    IF sync_person.target IS NOT NULL THEN
        only_id := (identity_sync._target(sync_person.target)).id;
    END IF;
    BEGIN
        known := identity_sync.person(person_key) IS NOT NULL;
    EXCEPTION WHEN data_exception THEN
        known := false;   -- not even of the key column's type
    END;
    IF person_key IS NULL OR NOT (known OR EXISTS (SELECT FROM identity_sync.account a
                                                    WHERE a.person_key = sync_person.person_key)) THEN
        RAISE EXCEPTION 'person "%" is unknown', person_key USING ERRCODE = 'no_data_found',
            DETAIL = 'The person source has no row with that key, and no target has an account of it.',
            HINT = 'Person keys are the person source''s key column as text, e.g. ''10001''.';
    END IF;
    INSERT INTO identity_sync.plan_run (persons, keys) VALUES (1, ARRAY[person_key]) RETURNING id INTO pid;
    -- In id order, as the worker's planner goes (_lock_target_plans).
    FOR t IN SELECT * FROM identity_sync.target x
              WHERE x.compiled IS NOT NULL AND (only_id IS NULL OR x.id = only_id) ORDER BY x.id LOOP
        n := n + identity_sync._plan_target(t, ARRAY[person_key], pid);
    END LOOP;
    UPDATE identity_sync.plan_run SET events = n WHERE id = pid;
    PERFORM identity_sync._audit('sync_person', person_key, NULL,
                                 jsonb_build_object('target', sync_person.target, 'events', n, 'plan_id', pid));
    PERFORM identity_sync._wake_at_commit();
    RETURN QUERY SELECT * FROM identity_sync.events e WHERE e.plan_id = pid ORDER BY e.target, e.seq;
END
$$;

-- True once nothing is dirty, pending or in flight (held and failed events, and the persons
-- of a target whose planning fails, waiting in _deferred, do not count);
-- false after the timeout. For scripts and tests. Like any statement, it holds its snapshot
-- while it waits, so nothing the worker leaves dead meanwhile can be removed; it looks every
-- 10 ms at first, then every 50 ms, so as not to take the CPU the worker needs.
CREATE FUNCTION identity_sync.wait_idle(timeout interval DEFAULT '30 seconds') RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
    looks int := 0;
BEGIN
    LOOP
        IF NOT EXISTS (SELECT FROM identity_sync.change)
           AND NOT EXISTS (SELECT FROM identity_sync._dirty)
           AND NOT EXISTS (SELECT FROM identity_sync.reconcile_run r WHERE r.state IN ('queued', 'scanning', 'comparing', 'planning'))
           AND NOT EXISTS (SELECT FROM identity_sync.event e JOIN identity_sync.target t ON t.id = e.target_id
                            WHERE e.state IN ('pending', 'sending', 'retry') AND NOT t.paused
                              -- events waiting behind a failed one wait for an operator, not for us
                              AND NOT EXISTS (SELECT FROM identity_sync.event f
                                               WHERE f.target_id = e.target_id AND f.person_key = e.person_key
                                                 AND f.seq < e.seq AND f.state = 'failed'))
        THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        looks := looks + 1;
        PERFORM pg_sleep(CASE WHEN looks <= 20 THEN 0.01 ELSE 0.05 END);
    END LOOP;
END
$$;

-- Dry run of one person: per target, in scope or not, matched rules, desired attributes and
-- groups, the current account, and the events a plan would write now. Changes nothing.
CREATE TYPE identity_sync.preview_row AS (
    target        text,     -- the target
    in_scope      boolean,  -- does a rule match?
    matched_rules text[],   -- the rules that match
    attributes    jsonb,    -- desired attributes
    groups        text[],   -- desired groups (rules and approved requests)
    account       jsonb,    -- the account in the registry now, if any
    events        jsonb,    -- the events a plan would write now, in order
    error         text      -- why this person cannot be planned, if it cannot
);

CREATE FUNCTION identity_sync.preview(person_key text, target text DEFAULT NULL)
RETURNS SETOF identity_sync.preview_row
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
    today date := identity_sync._today();
BEGIN
    PERFORM identity_sync._check_person_key(person_key);
    IF preview.target IS NOT NULL THEN
        PERFORM identity_sync._target(preview.target);
    END IF;
    FOR t IN SELECT * FROM identity_sync.target x
              WHERE preview.target IS NULL OR x.name = preview.target ORDER BY x.name LOOP
        PERFORM identity_sync._desired(t, ARRAY[person_key], today, false);
        PERFORM identity_sync._diff(t, ARRAY[person_key], today);
        RETURN QUERY
        SELECT t.name, coalesce(p.in_scope, false), coalesce(p.rules, d.rules, '{}'),
               coalesce(p.attributes, d.attributes), coalesce(p.groups, '{}'),
               (SELECT to_jsonb(a) - 'target' FROM identity_sync.accounts a
                 WHERE a.target = t.name AND a.person_key = preview.person_key),
               coalesce(p.events, '[]'), d.error
          FROM (SELECT preview.person_key AS k) AS q
          LEFT JOIN pg_temp._is_desired d ON d.person_key = q.k
          LEFT JOIN pg_temp._is_plan p ON p.person_key = q.k;
    END LOOP;
END
$$;

-- Every delivery attempt: the ones that did not deliver (_attempt, with the outcome retry,
-- failed, conflict or interrupted), the one that did (the event's own done row) and the one in
-- flight (the event's sending row).
CREATE VIEW identity_sync.attempts AS
SELECT a.event_id, t.name AS target, e.person_key, e.kind, a.attempt, a.sent_at,
       a.recorded_at AS finished_at, a.recorded_at - a.sent_at AS latency, a.outcome, a.http_status, a.error
  FROM identity_sync._attempt a
  JOIN identity_sync.event e ON e.id = a.event_id
  JOIN identity_sync.target t ON t.id = e.target_id
UNION ALL
SELECT e.id, t.name, e.person_key, e.kind, e.attempts, e.sent_at, e.done_at,
       e.done_at - e.sent_at, CASE e.state WHEN 'done' THEN 'done' ELSE 'in flight' END, e.http_status, NULL
  FROM identity_sync.event e JOIN identity_sync.target t ON t.id = e.target_id
 WHERE e.attempts > 0 AND (e.state = 'sending' OR (e.state = 'done' AND e.last_error IS NULL));

-- What caused a plan, in words: a captured HR change, or what else asked for it.
CREATE FUNCTION identity_sync._cause_kind(op text, source_id int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN op IN ('insert', 'update', 'delete', 'truncate') AND source_id IS NOT NULL THEN 'hr change'
                WHEN op = 'boundary' THEN 'date boundary'
                WHEN op = 'snapshot' THEN 'snapshot'
                WHEN op = 'resync' THEN 'resync'
                WHEN op = 'reconcile' THEN 'reconcile'
                WHEN op IN ('approve', 'revoke', 'expire', 'alter_product', 'drop_product') THEN 'self-service'
                WHEN op = 'lifecycle' THEN 'configuration'
                WHEN op = 'conflict' THEN 'uniqueness conflict'
                ELSE op END
$$;

-- The story of one person, in time order: changes still pending, then per plan its causes
-- (the HR change with its source, operation, transaction and commit time, or a date boundary,
-- snapshot, resync, reconcile, self-service decision, ...), the plan, its events, every
-- delivery attempt (status, latency, error) and each event's result.
CREATE FUNCTION identity_sync.trace(person_key text)
RETURNS TABLE (at timestamptz, step text, target text, detail jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH ev AS (
        -- per target: the (target_id, person_key, seq) index
        SELECT e.*, t.name AS target
          FROM identity_sync.target t
         CROSS JOIN LATERAL (SELECT * FROM identity_sync.event x
                              WHERE x.target_id = t.id AND x.person_key = trace.person_key) AS e),
    causes AS (
        SELECT pc.* FROM identity_sync.plan_cause pc WHERE pc.keys @> ARRAY[trace.person_key])
    SELECT * FROM (
        SELECT c.at, 'change'::text, NULL::text,
               jsonb_build_object('op', c.op, 'source', s.relation::text, 'xid', c.xid::text)
          FROM identity_sync.change c LEFT JOIN identity_sync.source s ON s.id = c.source_id
         WHERE person_key = ANY (c.keys)
        UNION ALL
        SELECT d.first_at, 'dirty', t.name, jsonb_build_object('op', d.op, 'source', s.relation::text)
          FROM identity_sync._dirty d LEFT JOIN identity_sync.source s ON s.id = d.source_id
          LEFT JOIN identity_sync.target t ON t.id = d.target_id
         WHERE d.person_key = trace.person_key
        UNION ALL
        -- waiting for a target whose planning fails (30_plan/60_plan.sql)
        SELECT d.first_at, 'waiting', t.name, jsonb_build_object('op', d.op, 'source', s.relation::text,
                                                                'reason', t.plan_error, 'next_attempt', t.plan_retry_at)
          FROM identity_sync._deferred d LEFT JOIN identity_sync.source s ON s.id = d.source_id
          JOIN identity_sync.target t ON t.id = d.target_id
         WHERE d.person_key = trace.person_key
        UNION ALL
        SELECT coalesce(l.committed_at, l.started_at, c.at), 'cause', t.name,
               jsonb_strip_nulls(jsonb_build_object(
                   'kind', identity_sync._cause_kind(c.op, l.source_id), 'op', c.op, 'plan_id', c.plan_id,
                   'change_id', c.change_id, 'source', l.source, 'xid', l.xid::text,
                   'transaction_started_at', l.started_at, 'committed_at', l.committed_at,
                   'persons', l.persons))
          FROM causes c LEFT JOIN identity_sync.change_log l ON l.id = c.change_id
          LEFT JOIN identity_sync.target t ON t.id = c.target_id
        UNION ALL
        -- (its events carry the planner transaction's start: the plan shows no later than them)
        SELECT least(p.started_at, (SELECT min(e.created_at) FROM ev e WHERE e.plan_id = p.id)), 'plan', NULL,
               jsonb_strip_nulls(jsonb_build_object('plan_id', p.id, 'persons', p.persons, 'events', p.events,
                                                    'caused_at', p.caused_at))
          FROM identity_sync.plan_run p WHERE p.id IN (SELECT c.plan_id FROM causes c)
        UNION ALL
        SELECT e.created_at, 'event ' || e.kind, e.target,
               jsonb_build_object('id', e.id, 'seq', e.seq, 'state', e.state, 'attempts', e.attempts,
                                  'payload', e.payload, 'plan_id', e.plan_id)
          FROM ev e
        UNION ALL
        SELECT a.sent_at, 'attempt ' || a.kind, a.target,
               jsonb_strip_nulls(jsonb_build_object('id', a.event_id, 'attempt', a.attempt, 'outcome', a.outcome,
                                  'http_status', a.http_status, 'latency', a.latency::text, 'error', a.error))
          FROM identity_sync.attempts a WHERE a.event_id IN (SELECT e.id FROM ev e)
        UNION ALL
        SELECT coalesce(e.done_at, e.sent_at), 'result ' || e.kind, e.target,
               jsonb_strip_nulls(jsonb_build_object('id', e.id, 'state', e.state, 'http_status', e.http_status,
                                  'error', e.last_error, 'latency', (e.done_at - e.created_at)::text))
          FROM ev e
         WHERE e.sent_at IS NOT NULL
        UNION ALL
        SELECT pe.at, 'plan error', t.name, jsonb_build_object('message', pe.message)
          FROM identity_sync._plan_error pe JOIN identity_sync.target t ON t.id = pe.target_id
         WHERE pe.person_key = trace.person_key
        UNION ALL
        SELECT f.found_at, 'reconcile ' || f.kind, t.name,
               jsonb_strip_nulls(jsonb_build_object('run', f.run_id, 'mode', r.mode, 'remote_id', f.remote_id,
                                  'attribute', f.attribute, 'desired', f.desired, 'actual', f.actual,
                                  'repaired', r.mode = 'repair' AND f.repairable))
          FROM identity_sync._finding f JOIN identity_sync.target t ON t.id = f.target_id
          JOIN identity_sync.reconcile_run r ON r.id = f.run_id
         WHERE f.person_key = trace.person_key
        UNION ALL
        -- notices about the person (55_notify.sql): sent, waiting, failed, or skipped and why
        SELECT x.created_at, 'notice ' || x.state, t.name,
               jsonb_strip_nulls(jsonb_build_object('id', x.id, 'notification', n.name, 'on_event', n.on_event,
                                  'channel', n.channel, 'recipient', x.recipient, 'subject', x.subject,
                                  'attempts', x.attempts, 'error', x.last_error, 'sent_at', x.sent_at))
          FROM identity_sync.notice x JOIN identity_sync.notification n ON n.id = x.notification_id
          LEFT JOIN identity_sync.target t ON t.id = x.target_id
         WHERE x.persons @> ARRAY[trace.person_key]
    ) AS q(at, step, target, detail)
    -- at the same moment, in the order of the story
    ORDER BY 1, array_position(ARRAY['change', 'dirty', 'waiting', 'cause', 'plan', 'event', 'attempt', 'result', 'notice'],
                               split_part(step, ' ', 1)), 2, 3
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

-- Readers: status, registry, events, audit.
GRANT SELECT ON identity_sync.status, identity_sync.accounts, identity_sync.events, identity_sync.audit_log,
                identity_sync.attempts
   TO identity_sync_reader;
GRANT SELECT ON identity_sync.status TO pg_monitor;
-- (worker_status is written in Rust, src/status.rs; lib.rs makes it come before this file.)
GRANT EXECUTE ON FUNCTION identity_sync.wait_idle(interval), identity_sync.worker_status()
   TO identity_sync_reader;

-- Operators: the levers.
GRANT EXECUTE ON FUNCTION identity_sync.pause(text), identity_sync.resume(text), identity_sync.release(text, text),
                          identity_sync.discard(text), identity_sync.retry(text), identity_sync.skip(bigint),
                          identity_sync.resync(text), identity_sync.preview(text, text), identity_sync.trace(text),
                          identity_sync.sync_person(text, text)
   TO identity_sync_operator;

COMMENT ON VIEW identity_sync.status IS 'One row per target: state (active, paused, held, failing), accounts and events by state, oldest pending age, last success and error, deliveries in the last hour, resync progress.';
COMMENT ON VIEW identity_sync.accounts IS 'The account registry by target name.';
COMMENT ON VIEW identity_sync.events IS 'Provisioning events by target name, with their delivery latency.';
COMMENT ON VIEW identity_sync.attempts IS 'Every delivery attempt of every event kept: outcome (done, in flight, retry, failed, conflict, interrupted), HTTP status, latency, error.';
COMMENT ON VIEW identity_sync.audit_log IS 'Every configuration and operator call: who, when, what, old and new (secrets never).';
COMMENT ON FUNCTION identity_sync.pause(text) IS 'Stop delivering to a target (planning goes on).';
COMMENT ON FUNCTION identity_sync.resume(text) IS 'Resume delivering to a paused target.';
COMMENT ON FUNCTION identity_sync.release(text, text) IS 'Let the events held by a threshold go out: all, or those of the persons with a held event of one kind (create, disable, delete, ...), the others staying held.';
COMMENT ON FUNCTION identity_sync.discard(text) IS 'Drop the events held by a threshold.';
COMMENT ON FUNCTION identity_sync.retry(text) IS 'Retry failed events of a target (by name) or one event (by id).';
COMMENT ON FUNCTION identity_sync.skip(bigint) IS 'Give up on one failed event so the person''s later events go on.';
COMMENT ON FUNCTION identity_sync.resync(text) IS 'Full reconcile of every person for a target, in batches; progress in status.';
COMMENT ON FUNCTION identity_sync.sync_person(text, text) IS 'Provision one person now: plan it in one target (or every target) at once and return the events written; the worker sends them at commit.';
COMMENT ON FUNCTION identity_sync.wait_idle(interval) IS 'Wait until nothing is dirty, pending or in flight; false on timeout.';
COMMENT ON FUNCTION identity_sync.preview(text, text) IS 'What a plan would do for a person now, per target; changes nothing.';
COMMENT ON FUNCTION identity_sync.trace(text) IS 'The story of one person in time order: each plan''s causes (HR change with source, operation, transaction and commit time; date boundary, snapshot, resync, reconcile, self-service), the plan, its events, every delivery attempt and each result.';
COMMENT ON FUNCTION identity_sync.worker_status() IS 'Whether a worker serves this database: state running (detail: its pid) or no worker (detail: why, hint: what to change).';

-- Say so when provisioning cannot happen here (pg_cron refuses to half-work in silence). A
-- WARNING, because PostgreSQL silences NOTICEs while it runs an extension script.
DO $check$
DECLARE
    s record;
BEGIN
    SELECT * INTO s FROM identity_sync.worker_status();
    IF s.state = 'no worker' AND s.hint IS NOT NULL THEN
        RAISE WARNING 'identity_sync: no worker will provision from this database'
            USING DETAIL = s.detail, HINT = s.hint;
    END IF;
END
$check$;
