-- Reconciliation: read a target's real state, compare it with the account registry, report
-- drift and orphans, repair through the planner, adopt accounts that exist before us.
--
-- A run goes queued → scanning → comparing → (planning →) done | failed | cancelled, every
-- step in the worker's own short transactions (src/reconcile.rs drives it):
--   1. scan     the worker reads the target (SCIM: paged GET /Users and /Groups on the delivery
--               runtime; table: _reconcile_scan_table) into _remote, a page per transaction;
--   2. compare  _reconcile_compare matches what was scanned with the registry, locally (remote
--               id first, then correlate_on), and writes _finding rows: the drift and orphans
--               views show the latest finished run of each target;
--   3. repair   (mode repair) the registry takes the target's actual state where it drifted,
--               and the persons concerned are planned again by the ordinary planner
--               (_plan_target), a batch per transaction: thresholds, dry run, ordering, trace
--               and audit apply unchanged. Orphans are retired the same way when the target's
--               option `orphans` says disable or delete.
--   4. adopt    (mode adopt, started by resync() on a target with correlate_on and no
--               accounts, or with adopt: true) plans every person with the scan at hand:
--               _adopt links a person without an account to the scanned account whose
--               correlate_on value is the person's desired one, before the diff, so the diff
--               plans an update where it would have planned a create.

CREATE TABLE identity_sync.reconcile_run (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_id      int NOT NULL,
    target         text NOT NULL,
    mode           text NOT NULL CHECK (mode IN ('report', 'repair', 'adopt')),
    state          text NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'scanning', 'comparing', 'planning', 'done', 'failed', 'cancelled')),
    requested_by   text NOT NULL,
    scheduled      boolean NOT NULL DEFAULT false,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    clock_at       timestamptz NOT NULL,        -- identity_sync's "now" at request (set_clock)
    started_at     timestamptz,
    finished_at    timestamptz,
    groups_read    boolean NOT NULL DEFAULT false,
    scanned        int NOT NULL DEFAULT 0,
    matched        int NOT NULL DEFAULT 0,
    drifted        int NOT NULL DEFAULT 0,
    missing        int NOT NULL DEFAULT 0,
    orphans        int NOT NULL DEFAULT 0,
    adopted        int NOT NULL DEFAULT 0,
    planned_events int NOT NULL DEFAULT 0,
    to_plan        int NOT NULL DEFAULT 0,      -- persons the repair or adoption plans
    error          text
);
-- Two runs of one target at once are impossible.
CREATE UNIQUE INDEX reconcile_run_active ON identity_sync.reconcile_run (target_id)
    WHERE state IN ('queued', 'scanning', 'comparing', 'planning');
CREATE INDEX reconcile_run_target ON identity_sync.reconcile_run (target_id, id);
SELECT pg_catalog.pg_extension_config_dump('identity_sync.reconcile_run', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.reconcile_run_id_seq', '');

-- What a scan found, one row per account on the target; kept for the latest finished run of
-- each target (and the running one).
CREATE TABLE identity_sync._remote (
    run_id     bigint NOT NULL,
    remote_id  text NOT NULL,
    identifier text,            -- userName, or the table's key
    active     boolean,         -- NULL: the target has no such flag
    attributes jsonb NOT NULL DEFAULT '{}',   -- managed attributes only, by mapped name
    groups     text[],          -- managed groups it is a member of; NULL: not read
    person_key text,            -- the person it belongs to; NULL: an orphan
    seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, remote_id)
) WITH (fillfactor = 50);   -- room for the compare's updates of person_key (HOT: not indexed)

-- Findings of a run, one row per person and difference.
CREATE TABLE identity_sync._finding (
    run_id     bigint NOT NULL,
    target_id  int NOT NULL,
    person_key text NOT NULL,
    remote_id  text,
    kind       text NOT NULL
               CHECK (kind IN ('changed', 'missing', 'disabled', 'enabled', 'group_missing', 'group_extra')),
    attribute  text,            -- changed: the attribute ("id": the account was found under another id);
                                -- group_*: the group
    desired    jsonb,
    actual     jsonb,
    repairable boolean NOT NULL DEFAULT true,   -- false: an on_create_only attribute (reported only)
    found_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON identity_sync._finding (run_id);
CREATE INDEX ON identity_sync._finding (person_key);

------------------------------------------------------------------------------------------------
-- Requests
------------------------------------------------------------------------------------------------

-- The target a reconcile may run for, or an error that says why not. Nothing is recorded.
CREATE FUNCTION identity_sync._reconcile_target(target text, mode text)
RETURNS identity_sync.target LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    running bigint;
BEGIN
    IF mode IS NULL OR mode NOT IN ('report', 'repair') THEN
        RAISE EXCEPTION 'invalid reconcile mode "%"', mode USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The modes are report (find and record only) and repair (then plan the events that undo the drift).';
    END IF;
    IF t.kind = 'webhook' THEN
        RAISE EXCEPTION 'target "%" cannot be reconciled: a webhook target cannot be read', t.name
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'A webhook receives events; it has no interface that lists the accounts it holds.',
                  HINT = 'Reconcile the system behind the webhook through a scim or table target, or use resync() to send the desired state again.';
    END IF;
    -- Without a rule nobody is in scope: every account would be an orphan.
    IF t.compiled IS NULL OR NOT EXISTS (SELECT FROM identity_sync.rule r WHERE r.target_id = t.id) THEN
        RAISE EXCEPTION 'target "%" has no rules yet, so nobody is in scope and nothing can be compared', t.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Register a person source (identity_sync.add_person_source()) and add rules with identity_sync.add_rule() first.';
    END IF;
    SELECT r.id INTO running FROM identity_sync.reconcile_run r
     WHERE r.target_id = t.id AND r.state IN ('queued', 'scanning', 'comparing', 'planning');
    IF running IS NOT NULL THEN
        RAISE EXCEPTION 'a reconcile of target "%" is already running (run %)', t.name, running
            USING ERRCODE = 'object_in_use',
                  HINT = 'Wait for it: SELECT * FROM identity_sync.reconcile_run WHERE id = ' || running || ';';
    END IF;
    RETURN t;
END
$$;

-- Queue a run (the worker takes it from here). Returns its id, NULL when one of the target is
-- already active (the unique index decides, so two overlapping runs are impossible).
CREATE FUNCTION identity_sync._reconcile_queue(target_id int, mode text, requested_by text, scheduled boolean)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    run bigint;
BEGIN
    INSERT INTO identity_sync.reconcile_run (target_id, target, mode, requested_by, scheduled, clock_at)
    SELECT t.id, t.name, _reconcile_queue.mode, _reconcile_queue.requested_by, _reconcile_queue.scheduled, identity_sync._now()
      FROM identity_sync.target t WHERE t.id = _reconcile_queue.target_id
    ON CONFLICT (target_id) WHERE state IN ('queued', 'scanning', 'comparing', 'planning') DO NOTHING
    RETURNING reconcile_run.id INTO run;
    IF run IS NOT NULL AND NOT _reconcile_queue.scheduled THEN
        PERFORM identity_sync._audit_as(_reconcile_queue.requested_by, 'reconcile', (SELECT t.name FROM identity_sync.target t WHERE t.id = _reconcile_queue.target_id),
                                        NULL, jsonb_build_object('run', run, 'mode', _reconcile_queue.mode));
    END IF;
    RETURN run;
END
$$;

-- An audit row written by the worker on behalf of the role that asked.
CREATE FUNCTION identity_sync._audit_as(actor text, action text, object text, old jsonb, new jsonb)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._audit (actor, action, object, old, new) VALUES (actor, action, object, old, new)
$$;

-- The summary row of a run, as reconcile() returns it.
CREATE TYPE identity_sync.reconcile_summary AS (
    run_id         bigint,
    target         text,
    mode           text,
    state          text,
    scanned        int,
    matched        int,
    drifted        int,
    missing        int,
    orphans        int,
    adopted        int,
    planned_events int,
    took           interval
);

-- Read the target, record what differs, and in mode repair plan what undoes it. Runs in the
-- worker (the target is read there, with its concurrency, timeouts and retries); the caller
-- waits, and may cancel: the run then stops and its findings are never shown half-written.
CREATE FUNCTION identity_sync.reconcile(target text, mode text DEFAULT 'report')
RETURNS identity_sync.reconcile_summary
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._reconcile_target(target, mode);
    run_id bigint;
    r identity_sync.reconcile_run;
BEGIN
    -- Enqueued through shared memory: the worker cannot see this transaction's rows.
    run_id := identity_sync._reconcile_wait(t.id, mode);
    SELECT * INTO r FROM identity_sync.reconcile_run x WHERE x.id = run_id;
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'a reconcile of target "%" is already running', t.name USING ERRCODE = 'object_in_use',
            HINT = 'See identity_sync.reconcile_run.';
    END IF;
    IF r.state = 'failed' THEN
        RAISE EXCEPTION 'reconcile of target "%" failed: %', t.name, r.error USING ERRCODE = 'external_routine_exception',
            DETAIL = format('Run %s scanned %s accounts before it stopped; nothing was changed.', r.id, r.scanned),
            HINT = 'Fix the cause and run it again; identity_sync.reconcile_run keeps the error.';
    END IF;
    RETURN ROW(r.id, r.target, r.mode, r.state, r.scanned, r.matched, r.drifted, r.missing, r.orphans,
               r.adopted, r.planned_events, r.finished_at - r.started_at)::identity_sync.reconcile_summary;
END
$$;

-- Targets whose reconcile_every has passed since their last run get a run (housekeeping).
CREATE FUNCTION identity_sync._reconcile_schedule() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
    n int := 0;
BEGIN
    FOR t IN SELECT x.id, x.options->>'reconcile_mode' AS mode
               FROM identity_sync.target x
              WHERE x.options->>'reconcile_every' IS NOT NULL AND x.kind <> 'webhook' AND x.compiled IS NOT NULL
                AND EXISTS (SELECT FROM identity_sync.rule ru WHERE ru.target_id = x.id)
                AND NOT x.paused
                AND coalesce((SELECT max(r.clock_at) FROM identity_sync.reconcile_run r WHERE r.target_id = x.id),
                             x.created_at) + (x.options->>'reconcile_every')::interval <= identity_sync._now() LOOP
        IF identity_sync._reconcile_queue(t.id, coalesce(t.mode, 'report'), 'identity_sync worker', true) IS NOT NULL THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

-- At worker start: a scan that was under way starts again (its pages are gone with the
-- process that held them); a run that was planning goes on from where it was.
CREATE FUNCTION identity_sync._reconcile_recover() RETURNS int
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH r AS (
        UPDATE identity_sync.reconcile_run SET state = 'queued', scanned = 0, groups_read = false
         WHERE state IN ('scanning', 'comparing') RETURNING id),
    d AS (DELETE FROM identity_sync._remote x USING r WHERE x.run_id = r.id)
    SELECT count(*)::int FROM r
$$;

------------------------------------------------------------------------------------------------
-- Scanning
------------------------------------------------------------------------------------------------

-- What a worker needs to start scanning the next queued run: the run, its target and what to
-- read. Marks the run scanning.
CREATE FUNCTION identity_sync._reconcile_next()
RETURNS TABLE (run_id bigint, target_id int, kind text, paths text[], groups text[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.reconcile_run;
BEGIN
    SELECT * INTO r FROM identity_sync.reconcile_run x WHERE x.state = 'queued' ORDER BY x.id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    UPDATE identity_sync.reconcile_run SET state = 'scanning', started_at = clock_timestamp() WHERE id = r.id;
    RETURN QUERY
    SELECT r.id, t.id, t.kind,
           ARRAY(SELECT m.attribute FROM identity_sync.mapping m WHERE m.target_id = t.id ORDER BY m.position),
           identity_sync._managed_groups(t.id)
      FROM identity_sync.target t WHERE t.id = r.target_id;
END
$$;

-- Every group the target's rules and self-service products can grant, and any an account holds.
CREATE FUNCTION identity_sync._managed_groups(target_id int) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT g ORDER BY g), '{}')
      FROM (SELECT unnest(r.groups) FROM identity_sync.rule r WHERE r.target_id = _managed_groups.target_id
            UNION ALL
            SELECT unnest(p.groups) FROM identity_sync.product p WHERE p.target_id = _managed_groups.target_id
            UNION ALL
            SELECT DISTINCT unnest(a.planned_groups) FROM identity_sync.account a
             WHERE a.target_id = _managed_groups.target_id AND a.planned_groups <> '{}') AS x(g)
$$;

-- The ids of the accounts the registry holds in the run's target: a SCIM scan looks up by id
-- those its paging did not return (core/src/deliver/scan.rs), so that an account skipped
-- because another was deleted while the scan paged is not reported missing.
CREATE FUNCTION identity_sync._reconcile_expected(run_id bigint) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(a.remote_id), '{}')
      FROM identity_sync.reconcile_run r
      JOIN identity_sync.account a ON a.target_id = r.target_id
     WHERE r.id = _reconcile_expected.run_id AND a.remote_id IS NOT NULL
       AND a.state IN ('active', 'disabled') AND NOT a.orphan
$$;

-- One page of scanned accounts: [{"remote_id", "identifier", "active", "attributes"}, ...].
-- NULL when the run is not scanning any more (cancelled, or its target dropped): the worker
-- then stops the scan.
CREATE FUNCTION identity_sync._reconcile_page(run_id bigint, accounts jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    PERFORM FROM identity_sync.reconcile_run r WHERE r.id = run_id AND r.state = 'scanning' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO identity_sync._remote (run_id, remote_id, identifier, active, attributes)
    SELECT _reconcile_page.run_id, x.remote_id, x.identifier, x.active, coalesce(x.attributes, '{}')
      FROM jsonb_to_recordset(accounts) AS x(remote_id text, identifier text, active boolean, attributes jsonb)
     WHERE x.remote_id IS NOT NULL
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE identity_sync.reconcile_run r SET scanned = r.scanned + n WHERE r.id = run_id;
    RETURN true;
END
$$;

-- Members of managed groups, as scanned: [{"group": name, "members": [remote ids]}, ...]
-- (every managed group the target has; the others have no members). NULL as for pages.
CREATE FUNCTION identity_sync._reconcile_groups(run_id bigint, members jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM FROM identity_sync.reconcile_run r WHERE r.id = run_id AND r.state = 'scanning' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE identity_sync._remote x
       SET groups = ARRAY(SELECT DISTINCT g FROM unnest(coalesce(x.groups, '{}') || m.groups) AS g ORDER BY g)
      FROM (SELECT v.remote_id, array_agg(DISTINCT e->>'group') AS groups
              FROM jsonb_array_elements(members) AS e,
                   jsonb_array_elements_text(e->'members') AS v(remote_id)
             GROUP BY v.remote_id) AS m
     WHERE x.run_id = _reconcile_groups.run_id AND x.remote_id = m.remote_id;
    UPDATE identity_sync.reconcile_run r SET groups_read = true WHERE r.id = _reconcile_groups.run_id;
    RETURN true;
END
$$;

-- A table target's rows, through its relation (local or postgres_fdw), in one statement.
-- Only the key, the active column and the mapped columns are read: what we do not map is never
-- looked at. The attributes are built from the columns by name (jsonb_build_object, 50 pairs
-- a call at most), so a wide row is never turned into JSON whole. A key found twice (a view, a
-- foreign table without a unique key) counts once. Each row is matched to its registry account
-- by key in the same statement (what _reconcile_compare's first step does for SCIM pages).
CREATE FUNCTION identity_sync._reconcile_scan_table(run_id bigint) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
    rel regclass;
    keycol text;
    activecol text;
    attrs text;
    n int;
BEGIN
    SELECT x.* INTO t FROM identity_sync.target x JOIN identity_sync.reconcile_run r ON r.target_id = x.id WHERE r.id = run_id;
    rel := (t.options->>'relation')::regclass;
    keycol := t.options->>'key_column';
    activecol := t.options->>'active_column';
    SELECT string_agg(format('jsonb_build_object(%s)', q.pairs), ' || ') INTO attrs
      FROM (SELECT string_agg(format('%L, r.%I', c.attname, c.attname), ', ' ORDER BY c.attnum) AS pairs
              FROM (SELECT a.attname, a.attnum, (row_number() OVER (ORDER BY a.attnum) - 1) / 50 AS chunk
                      FROM pg_catalog.pg_attribute a
                      JOIN identity_sync.mapping m ON m.target_id = t.id AND m.attribute = a.attname::text
                     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attname::text IS DISTINCT FROM keycol AND a.attname::text IS DISTINCT FROM activecol) AS c
             GROUP BY c.chunk) AS q;
    EXECUTE format(
        'INSERT INTO identity_sync._remote (run_id, remote_id, identifier, active, attributes, person_key)
         SELECT DISTINCT ON (r.%1$I::text) $1, r.%1$I::text, r.%1$I::text, %2$s, %3$s, a.person_key
           FROM %4$s AS r
           LEFT JOIN identity_sync.account a
             ON a.target_id = $2 AND a.remote_id = r.%1$I::text AND NOT a.orphan AND a.state <> ''deleted''
          WHERE r.%1$I IS NOT NULL
          ORDER BY r.%1$I::text, a.person_key',
        keycol,
        CASE WHEN activecol IS NULL THEN 'NULL::boolean' ELSE format('r.%I::boolean', activecol) END,
        coalesce(attrs, '''{}''::jsonb'),
        rel)
      USING run_id, t.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE identity_sync.reconcile_run r SET scanned = n WHERE r.id = run_id;
    RETURN n;
END
$$;

CREATE FUNCTION identity_sync._reconcile_fail(run_id bigint, error text, state text DEFAULT 'failed') RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE identity_sync.reconcile_run r
       SET state = _reconcile_fail.state, error = _reconcile_fail.error, finished_at = clock_timestamp()
     WHERE r.id = run_id AND r.state NOT IN ('done', 'failed', 'cancelled');
    DELETE FROM identity_sync._remote x WHERE x.run_id = _reconcile_fail.run_id;
    DELETE FROM identity_sync._finding f WHERE f.run_id = _reconcile_fail.run_id;
    -- Persons a repair or an adoption was still to plan go to the ordinary planner.
    UPDATE identity_sync._dirty d SET held_by = NULL WHERE d.held_by = _reconcile_fail.run_id;
    UPDATE identity_sync.target t SET adopting = NULL WHERE t.adopting = _reconcile_fail.run_id;
    IF _reconcile_fail.state = 'failed' THEN
        RAISE LOG 'identity_sync: reconcile run % failed: %', run_id, error;
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Comparing
------------------------------------------------------------------------------------------------

-- Two attribute values are the same when they are equal as JSON, or, for scalars, as text (a
-- table's integer column holds what a mapping computed as text; SCIM servers differ in how they
-- echo booleans and numbers). A missing value and null are the same.
CREATE FUNCTION identity_sync._same(a jsonb, b jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
             WHEN coalesce(a, 'null') = 'null' OR coalesce(b, 'null') = 'null' THEN coalesce(a, 'null') = coalesce(b, 'null')
             WHEN jsonb_typeof(a) IN ('object', 'array') OR jsonb_typeof(b) IN ('object', 'array') THEN a = b
             ELSE a #>> '{}' = b #>> '{}'
           END
$$;

-- Match what was scanned with the registry and record the findings; in mode repair, correct
-- the registry and queue the persons to plan. One transaction, set-based.
CREATE FUNCTION identity_sync._reconcile_compare(run_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.reconcile_run;
    t identity_sync.target;
    correlate text;
    orphan_policy text;
    create_only text[];
    n int;
BEGIN
    SELECT * INTO r FROM identity_sync.reconcile_run x WHERE x.id = run_id FOR UPDATE;
    IF r.state IS DISTINCT FROM 'scanning' THEN
        RETURN;
    END IF;
    SELECT * INTO t FROM identity_sync.target x WHERE x.id = r.target_id;
    UPDATE identity_sync.reconcile_run SET state = 'comparing' WHERE id = run_id;
    correlate := t.options->>'correlate_on';
    orphan_policy := coalesce(t.options->>'orphans', 'report');
    create_only := ARRAY(SELECT m.attribute FROM identity_sync.mapping m WHERE m.target_id = t.id AND m.on_create_only);
    -- (statistics of the columns the joins use; those of jsonb columns take long and serve nothing)
    ANALYZE identity_sync._remote (run_id, remote_id, person_key);

    IF r.mode = 'adopt' THEN
        -- Linking happens while planning (_adopt): hold every person for this run.
        UPDATE identity_sync.target SET adopting = run_id WHERE id = t.id;
        UPDATE identity_sync.reconcile_run x
           SET state = 'planning', to_plan = (SELECT count(*) FROM identity_sync._dirty d WHERE d.held_by = run_id)
         WHERE x.id = run_id;
        RETURN;
    END IF;

    -- The accounts to compare: settled ones (nothing unfinished for the person: what is in
    -- flight is delivery's business, not drift; nor anything delivered since the scan began,
    -- which the scan may have read before or after), with references resolved as delivery
    -- sends them.
    -- (The persons left out are collected first, each set by its own index, so that the plan
    -- does not hang on how fresh the statistics of a just-synced target's events are.)
    CREATE TEMP TABLE _is_rc ON COMMIT DROP AS
    WITH busy AS MATERIALIZED (
        SELECT e.person_key FROM identity_sync.event e WHERE e.target_id = t.id AND e.state <> 'done'
        UNION
        SELECT e.person_key FROM identity_sync.event e
         WHERE e.state = 'done' AND e.done_at >= r.started_at AND e.target_id = t.id)
    SELECT a.person_key, a.remote_id, a.state,
           CASE WHEN a.refs = '{}' THEN a.attributes ELSE identity_sync._resolve_refs(t.id, a.attributes) END AS attributes,
           a.attributes AS raw_attributes, a.groups
      FROM identity_sync.account a
     WHERE a.target_id = t.id AND a.state IN ('active', 'disabled') AND a.remote_id IS NOT NULL AND NOT a.orphan
       AND NOT EXISTS (SELECT FROM busy WHERE busy.person_key = a.person_key);
    ANALYZE pg_temp._is_rc (person_key, remote_id);

    -- 1. By the target's own id. (_remote leaves room on its pages and has no index on
    --    person_key, so these updates are HOT: no index entry is written for them.)
    UPDATE identity_sync._remote x SET person_key = a.person_key
      FROM pg_temp._is_rc a WHERE x.run_id = r.id AND x.remote_id = a.remote_id AND x.person_key IS NULL;
    -- 2. By correlate_on against the value we sent, for accounts whose id the target does not
    --    know any more (restored from a backup, recreated by hand): one account each way.
    IF correlate IS NOT NULL THEN
        WITH c AS (
            SELECT DISTINCT ON (a.person_key) a.person_key, x.remote_id
              FROM pg_temp._is_rc a JOIN identity_sync._remote x
                ON x.run_id = r.id AND x.person_key IS NULL AND x.attributes->>correlate = a.attributes->>correlate
             WHERE NOT EXISTS (SELECT FROM identity_sync._remote y WHERE y.run_id = r.id AND y.person_key = a.person_key)
             ORDER BY a.person_key, x.remote_id),
        one AS (SELECT DISTINCT ON (remote_id) * FROM c ORDER BY remote_id, person_key),
        u AS (UPDATE identity_sync._remote x SET person_key = one.person_key FROM one
               WHERE x.run_id = r.id AND x.remote_id = one.remote_id RETURNING x.person_key, x.remote_id)
        INSERT INTO identity_sync._finding (run_id, target_id, person_key, remote_id, kind, attribute, desired, actual)
        SELECT r.id, t.id, u.person_key, u.remote_id, 'changed', 'id', to_jsonb(a.remote_id), to_jsonb(u.remote_id)
          FROM u JOIN pg_temp._is_rc a USING (person_key);
    END IF;

    -- 3. Findings: the accounts not found, and what differs in those found (one join; an
    --    account whose scanned values contain every value we sent, with its active flag and
    --    groups as we left them, is passed over without an attribute-by-attribute look).
    INSERT INTO identity_sync._finding (run_id, target_id, person_key, remote_id, kind, attribute, desired, actual, repairable)
    SELECT r.id, t.id, a.person_key, a.remote_id, 'missing', NULL, NULL, NULL, true
      FROM pg_temp._is_rc a
     WHERE NOT EXISTS (SELECT FROM identity_sync._remote y WHERE y.run_id = r.id AND y.person_key = a.person_key)
    UNION ALL
    SELECT r.id, t.id, a.person_key, x.remote_id, f.kind, f.attribute, f.desired, f.actual, f.repairable
      FROM pg_temp._is_rc a JOIN identity_sync._remote x ON x.run_id = r.id AND x.person_key = a.person_key,
           LATERAL (
               SELECT 'changed', e.key, e.value, x.attributes->e.key, e.key <> ALL (create_only)
                 FROM jsonb_each(CASE WHEN x.attributes @> a.attributes THEN '{}' ELSE a.attributes END) AS e
                WHERE NOT identity_sync._same(e.value, x.attributes->e.key)
                  -- a table target's key and active columns are not attributes of the row
                  AND NOT (t.kind = 'table' AND e.key IN (t.options->>'key_column', t.options->>'active_column'))
                  -- a SCIM password is write-only: a service never returns it (RFC 7643 §4.1.1)
                  AND NOT (t.kind = 'scim' AND e.key ~* '(^|[:.])password$')
               UNION ALL
               SELECT CASE WHEN a.state = 'active' THEN 'disabled' ELSE 'enabled' END, 'active',
                      to_jsonb(a.state = 'active'), to_jsonb(x.active), true
                WHERE x.active IS NOT NULL AND x.active <> (a.state = 'active')
               UNION ALL
               SELECT 'group_missing', g, to_jsonb(true), to_jsonb(false), true
                 FROM unnest(a.groups) AS g
                WHERE r.groups_read AND g <> ALL (coalesce(x.groups, '{}'))
               UNION ALL
               SELECT 'group_extra', g, to_jsonb(false), to_jsonb(true), true
                 FROM unnest(x.groups) AS g
                WHERE r.groups_read AND g <> ALL (a.groups)
           ) AS f(kind, attribute, desired, actual, repairable)
     -- (the accounts where something may differ; the others are passed over at once)
     WHERE NOT x.attributes @> a.attributes
        OR (x.active IS NOT NULL AND x.active <> (a.state = 'active'))
        OR (r.groups_read AND NOT (coalesce(x.groups, '{}') @> a.groups AND a.groups @> coalesce(x.groups, '{}')));

    -- 4. Accounts left out of the comparison (events in flight, or delivered while the scan
    --    ran) still belong to their persons: never orphans.
    IF EXISTS (SELECT FROM identity_sync._remote x WHERE x.run_id = r.id AND x.person_key IS NULL) THEN
        UPDATE identity_sync._remote x SET person_key = a.person_key
          FROM identity_sync.account a
         WHERE x.run_id = r.id AND x.person_key IS NULL AND a.target_id = t.id AND NOT a.orphan
           AND a.state <> 'deleted' AND a.remote_id = x.remote_id
           AND NOT EXISTS (SELECT FROM pg_temp._is_rc c WHERE c.person_key = a.person_key);
        IF correlate IS NOT NULL THEN
            -- (a create in flight: the target may have the account before we know its id)
            UPDATE identity_sync._remote x SET person_key = a.person_key
              FROM identity_sync.account a
             WHERE x.run_id = r.id AND x.person_key IS NULL AND a.target_id = t.id AND NOT a.orphan
               AND a.planned_state <> 'deleted' AND x.attributes->>correlate = a.planned_attributes->>correlate
               AND NOT EXISTS (SELECT FROM pg_temp._is_rc c WHERE c.person_key = a.person_key);
        END IF;
    END IF;

    UPDATE identity_sync.reconcile_run x
       SET matched = s.matched, orphans = s.orphans, drifted = f.drifted, missing = f.missing
      FROM (SELECT count(*) FILTER (WHERE y.person_key IS NOT NULL) AS matched,
                   count(*) FILTER (WHERE y.person_key IS NULL) AS orphans
              FROM identity_sync._remote y WHERE y.run_id = r.id) AS s,
           (SELECT count(DISTINCT g.person_key) FILTER (WHERE g.kind <> 'missing') AS drifted,
                   count(*) FILTER (WHERE g.kind = 'missing') AS missing
              FROM identity_sync._finding g WHERE g.run_id = r.id) AS f
     WHERE x.id = r.id;

    IF r.mode = 'repair' THEN
        -- The registry takes the target's actual state where it drifted; planning the person
        -- again then computes the events from there, like for any other change.
        UPDATE identity_sync.account a
           SET remote_id = coalesce(c.new_id, a.remote_id),
               attributes = a.attributes || c.changed, planned_attributes = a.planned_attributes || c.changed,
               state = coalesce(c.state, a.state), planned_state = coalesce(c.state, a.planned_state),
               groups = c.groups, planned_groups = c.groups
          FROM (SELECT f.person_key,
                       max(f.actual #>> '{}') FILTER (WHERE f.kind = 'changed' AND f.attribute = 'id') AS new_id,
                       coalesce(jsonb_object_agg(f.attribute, coalesce(f.actual, 'null'))
                                FILTER (WHERE f.kind = 'changed' AND f.attribute <> 'id' AND f.repairable), '{}') AS changed,
                       max(CASE f.kind WHEN 'disabled' THEN 'disabled' WHEN 'enabled' THEN 'active' END) AS state,
                       ARRAY(SELECT g FROM unnest(min(rc.groups)) AS g
                              WHERE g <> ALL (coalesce(array_agg(f.attribute) FILTER (WHERE f.kind = 'group_missing'), '{}'))
                             UNION
                             SELECT unnest(coalesce(array_agg(f.attribute) FILTER (WHERE f.kind = 'group_extra'), '{}'))
                             ORDER BY 1) AS groups
                  FROM identity_sync._finding f JOIN pg_temp._is_rc rc USING (person_key)
                 WHERE f.run_id = r.id AND f.kind <> 'missing' AND f.repairable
                 GROUP BY f.person_key) AS c
         WHERE a.target_id = t.id AND a.person_key = c.person_key;
        -- Missing accounts are created again.
        UPDATE identity_sync.account a
           SET remote_id = NULL, state = 'deleted', planned_state = 'deleted', attributes = '{}', groups = '{}',
               planned_groups = '{}'
          FROM identity_sync._finding f
         WHERE f.run_id = r.id AND f.kind = 'missing' AND a.target_id = t.id AND a.person_key = f.person_key;
        -- Orphans are retired like persons who left, when the target says so.
        IF orphan_policy IN ('disable', 'delete') THEN
            INSERT INTO identity_sync.account AS a (target_id, person_key, remote_id, state, planned_state, attributes,
                                                    planned_attributes, groups, planned_groups, orphan, applied_at)
            SELECT t.id, 'orphan:' || x.remote_id, x.remote_id, s, s, x.attributes, x.attributes,
                   coalesce(x.groups, '{}'), coalesce(x.groups, '{}'), true, now()
              FROM identity_sync._remote x
             CROSS JOIN LATERAL (SELECT CASE WHEN x.active IS FALSE THEN 'disabled' ELSE 'active' END AS s) AS st
             WHERE x.run_id = r.id AND x.person_key IS NULL
               AND (orphan_policy = 'delete' OR x.active IS NOT FALSE)
            ON CONFLICT (target_id, person_key) DO UPDATE
               SET remote_id = excluded.remote_id, state = excluded.state, planned_state = excluded.planned_state,
                   attributes = excluded.attributes, planned_attributes = excluded.planned_attributes,
                   groups = excluded.groups, planned_groups = excluded.planned_groups, orphan = true;
        END IF;
        INSERT INTO identity_sync._dirty AS d (person_key, target_id, op, first_at, held_by)
        SELECT DISTINCT f.person_key, t.id, 'reconcile', now(), r.id
          FROM identity_sync._finding f WHERE f.run_id = r.id AND f.repairable
        UNION
        SELECT 'orphan:' || x.remote_id, t.id, 'reconcile', now(), r.id
          FROM identity_sync._remote x
         WHERE x.run_id = r.id AND x.person_key IS NULL AND orphan_policy IN ('disable', 'delete')
           AND (orphan_policy = 'delete' OR x.active IS NOT FALSE)
        ON CONFLICT (person_key, target_id) DO UPDATE SET held_by = excluded.held_by, op = excluded.op;
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE identity_sync.reconcile_run SET state = 'planning', to_plan = n WHERE id = r.id;
    ELSE
        PERFORM identity_sync._reconcile_finish(r.id);
    END IF;
END
$$;

-- Plan one batch of the persons a repair or an adoption holds, through the ordinary planner.
-- Returns the persons planned; 0 once the run is finished.
CREATE FUNCTION identity_sync._reconcile_plan(run_id bigint, batch_size int) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.reconcile_run;
    t identity_sync.target;
    keys text[];
    plan_id bigint;
    n int;
BEGIN
    SELECT * INTO r FROM identity_sync.reconcile_run x WHERE x.id = run_id;
    IF r.state IS DISTINCT FROM 'planning' THEN
        RETURN 0;
    END IF;
    PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);
    -- (deleted by ctid, never by a join planned on stale statistics: _plan, 60_plan.sql)
    WITH b AS (
        SELECT d.ctid FROM identity_sync._dirty d
         WHERE d.held_by = run_id AND d.target_id = r.target_id
         ORDER BY d.person_key LIMIT batch_size FOR UPDATE SKIP LOCKED),
    x AS (
        DELETE FROM identity_sync._dirty d WHERE d.ctid = ANY (ARRAY(SELECT b.ctid FROM b))
        RETURNING d.person_key)
    SELECT array_agg(person_key) INTO keys FROM x;
    IF keys IS NULL THEN
        PERFORM identity_sync._reconcile_finish(run_id);
        RETURN 0;
    END IF;
    SELECT * INTO t FROM identity_sync.target x WHERE x.id = r.target_id;
    plan_id := identity_sync._plan_run(keys, t.id, CASE r.mode WHEN 'adopt' THEN 'resync' ELSE 'reconcile' END,
                                       r.requested_at);
    n := identity_sync._plan_target(t, keys, plan_id);
    UPDATE identity_sync.plan_run SET events = n WHERE id = plan_id;
    UPDATE identity_sync.reconcile_run x SET planned_events = x.planned_events + n WHERE x.id = run_id;
    PERFORM identity_sync._wake_at_commit();
    RETURN cardinality(keys);
END
$$;

-- Adoption, called by _plan_target between the desired state and the diff while the target
-- adopts: a person without an account takes the scanned account whose correlate_on value (a
-- table target: whose key) is the person's desired one. The registry records that account's
-- actual state, so the diff plans the update, enable/disable and grants that bring it in line.
CREATE FUNCTION identity_sync._adopt(t identity_sync.target) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    correlate text := t.options->>'correlate_on';
    n int;
BEGIN
    IF t.adopting IS NULL OR (correlate IS NULL AND t.kind <> 'table') THEN
        RETURN 0;
    END IF;
    PERFORM identity_sync._scratch('_is_adopt', 'person_key text, remote_id text');
    INSERT INTO pg_temp._is_adopt
    SELECT DISTINCT ON (m.person_key) m.person_key, m.remote_id
      FROM (SELECT DISTINCT ON (x.remote_id) d.person_key, x.remote_id
              FROM pg_temp._is_desired d
              JOIN identity_sync._remote x
                ON x.run_id = t.adopting AND x.person_key IS NULL
               AND CASE WHEN t.kind = 'table' THEN x.remote_id = d.person_key
                        ELSE x.attributes->>correlate = d.attributes->>correlate END
             WHERE d.error IS NULL AND d.rules <> '{}' AND d.creatable_now
               AND NOT EXISTS (SELECT FROM identity_sync.account a
                                WHERE a.target_id = t.id AND a.person_key = d.person_key AND a.planned_state <> 'deleted')
             ORDER BY x.remote_id, d.person_key) AS m
     ORDER BY m.person_key, m.remote_id;
    UPDATE identity_sync._remote x SET person_key = m.person_key
      FROM pg_temp._is_adopt m WHERE x.run_id = t.adopting AND x.remote_id = m.remote_id;
    INSERT INTO identity_sync.account AS a (target_id, person_key, remote_id, state, planned_state, attributes,
                                            planned_attributes, groups, planned_groups, applied_at)
    SELECT t.id, m.person_key, x.remote_id, s.state, s.state, x.attributes, x.attributes,
           coalesce(x.groups, '{}'), coalesce(x.groups, '{}'), now()
      FROM pg_temp._is_adopt m JOIN identity_sync._remote x ON x.run_id = t.adopting AND x.remote_id = m.remote_id
     -- A SCIM account that does not say it is active is taken as inactive, so that the plan
     -- enables it (RFC 7643: active is optional; a pre-existing user may not carry it).
     CROSS JOIN LATERAL (SELECT CASE WHEN x.active IS TRUE THEN 'active' WHEN x.active IS FALSE THEN 'disabled'
                                     WHEN t.kind = 'scim' THEN 'disabled' ELSE 'active' END AS state) AS s
    ON CONFLICT (target_id, person_key) DO UPDATE
       SET remote_id = excluded.remote_id, state = excluded.state, planned_state = excluded.planned_state,
           attributes = excluded.attributes, planned_attributes = excluded.planned_attributes,
           groups = excluded.groups, planned_groups = excluded.planned_groups, applied_at = excluded.applied_at;
    GET DIAGNOSTICS n = ROW_COUNT;
    -- The values of unique attributes the adopted accounts hold are taken.
    INSERT INTO identity_sync._unique (target_id, attribute, value, person_key)
    SELECT t.id, mp.attribute, d.attributes->>mp.attribute, d.person_key
      FROM pg_temp._is_adopt m JOIN pg_temp._is_desired d USING (person_key)
      JOIN identity_sync.mapping mp ON mp.target_id = t.id AND mp.is_unique
     WHERE d.attributes->>mp.attribute IS NOT NULL
    ON CONFLICT (target_id, attribute, value) DO UPDATE SET person_key = excluded.person_key;
    UPDATE identity_sync.reconcile_run x SET adopted = x.adopted + n WHERE x.id = t.adopting;
    RETURN n;
END
$$;

-- A run is done: keep its scan and findings, drop those of the target's earlier runs.
CREATE FUNCTION identity_sync._reconcile_finish(run_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.reconcile_run;
BEGIN
    UPDATE identity_sync.reconcile_run x SET state = 'done', finished_at = clock_timestamp()
     WHERE x.id = run_id RETURNING * INTO r;
    UPDATE identity_sync.target t SET adopting = NULL WHERE t.adopting = run_id;
    DELETE FROM identity_sync._remote x
     USING identity_sync.reconcile_run o
     WHERE x.run_id = o.id AND o.target_id = r.target_id AND o.id < r.id;
    DELETE FROM identity_sync._finding f WHERE f.target_id = r.target_id AND f.run_id < r.id;
    RAISE LOG 'identity_sync: reconcile run % of target "%" (%): % scanned, % matched, % drifted, % missing, % orphans, % adopted, % events planned',
        r.id, r.target, r.mode, r.scanned, r.matched, r.drifted, r.missing, r.orphans, r.adopted, r.planned_events;
END
$$;

------------------------------------------------------------------------------------------------
-- Findings as users read them
------------------------------------------------------------------------------------------------

-- The latest finished report or repair of each target.
CREATE FUNCTION identity_sync._latest_reconcile(target_id int) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT max(r.id) FROM identity_sync.reconcile_run r
     WHERE r.target_id = _latest_reconcile.target_id AND r.state = 'done' AND r.mode IN ('report', 'repair')
$$;

CREATE VIEW identity_sync.drift AS
SELECT t.name AS target, f.person_key, f.remote_id, f.kind, f.attribute, f.desired, f.actual,
       f.repairable, f.found_at, f.run_id
  FROM identity_sync.target t
  JOIN identity_sync._finding f ON f.target_id = t.id AND f.run_id = identity_sync._latest_reconcile(t.id);

CREATE VIEW identity_sync.orphans AS
SELECT t.name AS target, x.remote_id, x.identifier, x.active, x.seen_at, x.run_id AS last_run
  FROM identity_sync.target t
  JOIN identity_sync._remote x ON x.run_id = identity_sync._latest_reconcile(t.id)
 WHERE x.person_key IS NULL;

-- The current run of each target, for status.
CREATE FUNCTION identity_sync._reconcile_progress(target_id int) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('run %s (%s): %s', r.id, r.mode,
                  CASE r.state
                    WHEN 'queued' THEN 'queued'
                    WHEN 'scanning' THEN format('%s accounts scanned', r.scanned)
                    WHEN 'comparing' THEN format('comparing %s accounts', r.scanned)
                    ELSE format('%s of %s persons planned', r.to_plan - (SELECT count(*) FROM identity_sync._dirty d WHERE d.held_by = r.id), r.to_plan)
                  END)
      FROM identity_sync.reconcile_run r
     WHERE r.target_id = _reconcile_progress.target_id AND r.state IN ('queued', 'scanning', 'comparing', 'planning')
$$;

REVOKE ALL ON FUNCTION identity_sync.reconcile(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION identity_sync.reconcile(text, text) TO identity_sync_operator;
GRANT SELECT ON identity_sync.reconcile_run, identity_sync.drift, identity_sync.orphans TO identity_sync_reader;
GRANT SELECT ON identity_sync.reconcile_run TO pg_monitor;

COMMENT ON TABLE identity_sync.reconcile_run IS
    'Reconcile runs: who asked, when, in which mode, what was scanned and found, the events planned, and the error of a failed run.';
COMMENT ON FUNCTION identity_sync.reconcile(text, text) IS
    'Read the target''s real state in the worker and compare it with the registry (mode report: record drift and orphans only; repair: then plan the events that undo the drift). Returns the summary of the run.';
COMMENT ON VIEW identity_sync.drift IS
    'Differences between each target and the registry found by its latest reconcile: changed attributes, missing accounts, accounts enabled or disabled behind our back, group memberships missing or extra.';
COMMENT ON VIEW identity_sync.orphans IS
    'Accounts found on each target by its latest reconcile that belong to no person.';
COMMENT ON TYPE identity_sync.reconcile_summary IS 'The summary row reconcile() returns.';
