-- identity_sync 0.1.0 → 0.2.0, run by ALTER EXTENSION identity_sync UPDATE (README "Upgrading").
--
-- One script per release, hand-kept as pgmq keeps its upgrade scripts: what holds data is
-- changed in place (new tables, columns added with their defaults, indexes, roles created only
-- if missing), and what is code (functions, views, event triggers) is created again from the
-- definitions 0.2.0 creates afresh. tests/upgrade.rs installs 0.1.0, fills it, runs this
-- script on the running cluster and compares the catalog with a fresh CREATE EXTENSION
-- (tests/upgrade/catalog.sql): the two must be identical, privileges and comments included.
-- All of it is hand-written except the functions and views of sql/ between the two marker
-- lines below, which scripts/upgrade-refresh writes: run it after changing one of them.
--
-- The functions written in Rust (MODULE_PATHNAME) are in the new library, which replaced the
-- old one before this script runs; PostgreSQL must have been restarted since, because the
-- library is preloaded (see the README).

\echo Use "ALTER EXTENSION identity_sync UPDATE TO '0.2.0'" to load this file. \quit

-- The previous release's event triggers are off while this script runs (enabled again near its
-- end): they would run 0.1.0's functions on this script's own DDL, and those call the new
-- library with 0.1.0's arguments (_follow_source_ddl checks the sources' affected queries
-- with _check_query, whose arguments changed: "unboxing what_ argument failed"). The script
-- changes no source. ALTER EVENT TRIGGER fires no event trigger, and a failed update rolls it
-- back with everything else.
ALTER EVENT TRIGGER identity_sync_follow_source_ddl DISABLE;
ALTER EVENT TRIGGER identity_sync_refuse_source_drop DISABLE;

-- ---------------------------------------------------------------------------------------------
-- Roles
-- ---------------------------------------------------------------------------------------------

-- The role user SQL runs as (00_schema.sql): created only if missing, like the other roles.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'identity_sync_evaluator') THEN
        CREATE ROLE identity_sync_evaluator NOLOGIN;
    END IF;
END
$roles$;

-- ---------------------------------------------------------------------------------------------
-- What 0.2.0 no longer has, or has with other arguments or results (created again below);
-- views are dropped first, since they depend on the functions they call
-- ---------------------------------------------------------------------------------------------

DROP VIEW identity_sync.status;
DROP VIEW identity_sync.pending_changes;
DROP FUNCTION identity_sync._check_expression(text,integer,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync._check_query(text,integer,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync._check_user_expression(identity_sync.target,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync._uniqueness_conflict(identity_sync.event,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync._reconcile_page(bigint,jsonb);   -- its result or argument names changed
DROP FUNCTION identity_sync._reconcile_groups(bigint,jsonb);   -- its result or argument names changed
DROP FUNCTION identity_sync._end_hold(identity_sync.target,text,integer);   -- gone, or its arguments changed
DROP FUNCTION identity_sync.release(text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync._add_source(regclass,text,text,name,name,name,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync.add_person_source(regclass,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync.add_contract_source(regclass,text,text,text);   -- gone, or its arguments changed
DROP FUNCTION identity_sync._plan(integer);   -- its argument's default is gone (identity_sync.batch_size has the one)

-- ---------------------------------------------------------------------------------------------
-- Tables (00_schema.sql, 48_reconcile.sql): rows stay; new columns come last with their defaults
-- ---------------------------------------------------------------------------------------------

-- The outbox: the writing transaction. Rows captured before the update get the id of this
-- transaction, which has no commit time noted, so their commit time reads as unknown (NULL).
ALTER TABLE identity_sync.change ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
COMMENT ON COLUMN identity_sync.change.xid IS 'The transaction that wrote the change (pg_current_xact_id()).';

CREATE TABLE identity_sync.change_log (
    id           bigint PRIMARY KEY,
    source_id    int,
    source       text,
    op           text NOT NULL,
    persons      int NOT NULL,
    xid          xid8,
    started_at   timestamptz NOT NULL,
    committed_at timestamptz,
    claimed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON identity_sync.change_log (claimed_at);

-- Persons waiting to be planned keep no change ids from before the update.
ALTER TABLE identity_sync._dirty ADD COLUMN change_ids bigint[] NOT NULL DEFAULT '{}';
-- _plan resumes its scan after the last person it claimed: the whole key after first_at.
DROP INDEX identity_sync._dirty_first_at_idx;
CREATE INDEX ON identity_sync._dirty (first_at, person_key, target_id) WHERE held_by IS NULL;

CREATE TABLE identity_sync._deferred (
    target_id  int NOT NULL,
    person_key text NOT NULL,
    source_id  int,
    op         text NOT NULL,
    first_at   timestamptz NOT NULL,
    change_ids bigint[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (target_id, person_key)
);

ALTER TABLE identity_sync.target
    ADD COLUMN plan_failures  int NOT NULL DEFAULT 0,
    ADD COLUMN plan_failed_at timestamptz,
    ADD COLUMN plan_error     text,
    ADD COLUMN plan_retry_at  timestamptz;

CREATE INDEX event_plan ON identity_sync.event (plan_id);

-- Whether a target's accounts refer to anybody at all (00_schema.sql, _apply_done).
CREATE INDEX account_refs_target ON identity_sync.account (target_id) WHERE refs <> '{}';

CREATE TABLE identity_sync._attempt (
    event_id    bigint NOT NULL,
    attempt     int NOT NULL,
    sent_at     timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome     text NOT NULL,
    http_status int,
    error       text
);
CREATE INDEX ON identity_sync._attempt (event_id);
CREATE INDEX ON identity_sync._attempt (recorded_at);

-- The counters start at the update: deliveries before it are not counted.
CREATE TABLE identity_sync._delivery_stats (
    target_id       int PRIMARY KEY REFERENCES identity_sync.target ON DELETE CASCADE,
    delivered       bigint NOT NULL DEFAULT 0,
    failed_attempts bigint NOT NULL DEFAULT 0,
    last_success    timestamptz,
    last_failure    timestamptz
);

-- Plan runs from before the update have no cause recorded (caused_at NULL, no plan_cause rows).
ALTER TABLE identity_sync.plan_run ADD COLUMN caused_at timestamptz;
CREATE INDEX ON identity_sync.plan_run (started_at);

CREATE TABLE identity_sync.plan_cause (
    plan_id   bigint NOT NULL REFERENCES identity_sync.plan_run ON DELETE CASCADE,
    target_id int,
    change_id bigint,
    op        text NOT NULL,
    at        timestamptz NOT NULL,
    keys      text[] NOT NULL
);
CREATE INDEX ON identity_sync.plan_cause (plan_id);
CREATE INDEX ON identity_sync.plan_cause USING gin (keys);
CREATE INDEX ON identity_sync.plan_cause (change_id) WHERE change_id IS NOT NULL;

-- Reconcile scans (48_reconcile.sql): the compare updates person_key in place (HOT), so the
-- index on it goes and pages keep room.
DROP INDEX identity_sync._remote_run_id_person_key_idx;
ALTER TABLE identity_sync._remote SET (fillfactor = 50);

-- Several sources (15_sources.sql): the sources of 0.1.0 are the default person source and its
-- contract source; persons are linked only once another person source is registered.
ALTER TABLE identity_sync._settings ADD COLUMN person_match text;
ALTER TABLE identity_sync.source ADD COLUMN name text, ADD COLUMN priority int;
UPDATE identity_sync.source SET name = 'default', priority = CASE WHEN role = 'person' THEN 100 END
 WHERE role IN ('person', 'contract');
CREATE UNIQUE INDEX source_name ON identity_sync.source (role, name) WHERE role IN ('person', 'contract');
CREATE TABLE identity_sync._person_link (
    source     text NOT NULL,
    source_key text NOT NULL,
    person_key text NOT NULL,
    linked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, source_key)
);
CREATE INDEX ON identity_sync._person_link (person_key);
CREATE TABLE identity_sync._merge_conflict (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_key  text NOT NULL,
    merged_key  text NOT NULL,
    targets     text[] NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    resolution  text CHECK (resolution IN ('retire', 'keep'))
);
CREATE UNIQUE INDEX merge_conflict_open ON identity_sync._merge_conflict (merged_key) WHERE resolved_at IS NULL;

GRANT SELECT ON identity_sync.change_log, identity_sync.plan_cause TO identity_sync_reader;

SELECT pg_catalog.pg_extension_config_dump('identity_sync._deferred', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.change_log', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.plan_run', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.plan_cause', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._attempt', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._delivery_stats', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._person_link', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._merge_conflict', '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.plan_run', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync._merge_conflict', 'id')::regclass, '');

COMMENT ON TABLE identity_sync.plan_run IS 'One row per planner transaction: which persons it planned and how many events it wrote; caused_at: its earliest cause.';
COMMENT ON TABLE identity_sync.plan_cause IS 'Why a plan planned whom: the captured changes it consumed (change_id) or another cause (op resync, reconcile, lifecycle, conflict), with the persons concerned.';
COMMENT ON TABLE identity_sync.change_log IS 'Captured changes the planner has claimed from the outbox: source, operation, HR transaction (xid) and when it started and committed; kept as long as the plans that consumed them.';
COMMENT ON TABLE identity_sync.source IS 'Registered HR sources: person sources, contract sources, related sources.';
COMMENT ON COLUMN identity_sync.source.name IS 'Person source: its name (''default'' unless given); contract source: the name of the person source its contracts belong to.';
COMMENT ON COLUMN identity_sync.source.priority IS 'Person source: with several, the record of the highest priority that has the person is person.';
COMMENT ON COLUMN identity_sync.change_log.committed_at IS 'Commit time of the HR transaction: recorded by the capturing backend at commit, or from track_commit_timestamp; NULL when neither knows it.';

-- Notifications (00_schema.sql, 55_notify.sql): rules and their outbox, new in 0.2.0.
CREATE TABLE identity_sync.notification (
    id          int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (btrim(name) <> ''),
    on_event    text NOT NULL,
    target_id   int REFERENCES identity_sync.target ON DELETE CASCADE,   -- NULL: every target
    recipients  text NOT NULL,          -- SQL giving text or text[]: addresses (mail) or names (webhook)
    subject     text NOT NULL,          -- SQL giving text
    body        text NOT NULL,          -- SQL giving text
    channel     text NOT NULL CHECK (channel IN ('mail', 'webhook')),
    options     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity_sync.notice (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id int NOT NULL REFERENCES identity_sync.notification ON DELETE CASCADE,
    target_id       int,                -- the target it is about, if any
    persons         text[] NOT NULL DEFAULT '{}',   -- the persons it is about (trace)
    about           text[] NOT NULL DEFAULT '{}',   -- what caused it: 'event 12', 'request 3', 'hold 2', ...
    recipient       text,               -- NULL: skipped (last_error says why)
    subject         text,
    body            text,
    items           int NOT NULL DEFAULT 1,          -- notices collected into this message (digest)
    digest          boolean NOT NULL DEFAULT false,  -- collecting until due_at
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sending', 'sent', 'retry', 'failed', 'skipped', 'held')),
    attempts        int NOT NULL DEFAULT 0,
    due_at          timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
-- The worker claims due notices ('sending' ones whose lease ran out too: a crash's).
CREATE INDEX notice_due ON identity_sync.notice (due_at) WHERE state IN ('pending', 'retry', 'sending');
-- One collecting digest per rule and recipient.
CREATE UNIQUE INDEX notice_digest ON identity_sync.notice (notification_id, recipient)
    WHERE digest AND state = 'pending' AND attempts = 0;
CREATE INDEX notice_persons ON identity_sync.notice USING gin (persons);
CREATE INDEX notice_about ON identity_sync.notice USING gin (about);
CREATE INDEX notice_created ON identity_sync.notice (created_at);
CREATE INDEX notice_target ON identity_sync.notice (target_id, state);
GRANT SELECT ON identity_sync.notification, identity_sync.notice TO identity_sync_reader;
SELECT pg_catalog.pg_extension_config_dump('identity_sync.notification', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.notice', '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.notification', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.notice', 'id')::regclass, '');
COMMENT ON TABLE identity_sync.notification IS 'Notification rules: on which event whom to tell (recipients, subject and body are SQL), by mail or webhook.';
COMMENT ON TABLE identity_sync.notice IS 'The notification outbox: one message per rule and recipient, written in the transaction that caused it, sent by the worker with retries.';
COMMENT ON COLUMN identity_sync.notice.state IS 'pending, sending, sent, retry, failed (given up or permanent), skipped (no recipient: last_error says why), held (about events a threshold holds: sent at release, dropped at discard).';

-- ---------------------------------------------------------------------------------------------
-- New types
-- ---------------------------------------------------------------------------------------------

CREATE TYPE identity_sync._key_hash AS (person_key text, hash bytea);
CREATE TYPE identity_sync._desired_row AS (person_key text, rules text[], groups text[], attributes jsonb, exists_now boolean, enabled_now boolean, creatable_now boolean);
CREATE TYPE identity_sync._notice_row AS (ord bigint, recipients jsonb, subject text, body text);

-- ---------------------------------------------------------------------------------------------
-- Functions written in Rust (src/, MODULE_PATHNAME) that are new or changed, by hand: the SQL
-- pgrx generates for them, as pg_get_functiondef shows it after a fresh install
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION identity_sync._at(n integer)
 RETURNS boolean
 LANGUAGE c
 PARALLEL RESTRICTED STRICT
AS 'MODULE_PATHNAME', $function$identity_sync_at$function$;

CREATE OR REPLACE FUNCTION identity_sync._check_expression(query text, "offset" integer, expression text, what text DEFAULT 'expression'::text)
 RETURNS oid
 LANGUAGE c
 STRICT
AS 'MODULE_PATHNAME', $function$check_expression_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._check_query(query text, "offset" integer, user_query text, what text DEFAULT 'query'::text)
 RETURNS integer
 LANGUAGE c
 STRICT
AS 'MODULE_PATHNAME', $function$check_query_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._commit_time(xid bigint)
 RETURNS timestamp with time zone
 LANGUAGE c
 PARALLEL SAFE STRICT
AS 'MODULE_PATHNAME', $function$commit_time_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._evaluate(query text, result anyelement, names text[] DEFAULT NULL::text[], a1 text[] DEFAULT NULL::text[], a2 date DEFAULT NULL::date, a3 integer DEFAULT NULL::integer, a4 text[] DEFAULT NULL::text[], timeout_ms integer DEFAULT NULL::integer, setting text DEFAULT NULL::text)
 RETURNS anyelement
 LANGUAGE c
AS 'MODULE_PATHNAME', $function$evaluate_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._exclude_worker()
 RETURNS void
 LANGUAGE c
 STRICT
AS 'MODULE_PATHNAME', $function$exclude_worker_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._failed_at()
 RETURNS integer
 LANGUAGE c
 STRICT
AS 'MODULE_PATHNAME', $function$failed_at_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._raise(sqlstate text, message text, detail text, hint text)
 RETURNS void
 LANGUAGE c
 PARALLEL SAFE
AS 'MODULE_PATHNAME', $function$raise_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._run_as()
 RETURNS text
 LANGUAGE c
 STABLE PARALLEL SAFE STRICT
AS 'MODULE_PATHNAME', $function$run_as_sql_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._statement_timeout()
 RETURNS interval
 LANGUAGE c
 STABLE PARALLEL SAFE STRICT
AS 'MODULE_PATHNAME', $function$statement_timeout_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._timed_out()
 RETURNS boolean
 LANGUAGE c
 STRICT
AS 'MODULE_PATHNAME', $function$timed_out_wrapper$function$;

CREATE OR REPLACE FUNCTION identity_sync._capture()
 RETURNS trigger
 LANGUAGE c
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS 'MODULE_PATHNAME', $function$_capture_wrapper$function$;

-- ---------------------------------------------------------------------------------------------
-- Functions and views of sql/ that are new or changed, in the order the fresh script creates
-- them (CREATE OR REPLACE keeps an unchanged signature's privileges); after changing a
-- function or view under sql/, run scripts/upgrade-refresh, which rewrites what is between
-- the two marker lines (tests/upgrade.rs fails while it is out of date)
-- ---------------------------------------------------------------------------------------------

-- >>> BEGIN generated by scripts/upgrade-refresh from sql/: the functions and views new or changed since the previous release; do not edit by hand

-- sql/00_schema.sql

CREATE OR REPLACE FUNCTION identity_sync._settings_upsert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM identity_sync._settings) THEN
        UPDATE identity_sync._settings
           SET primary_contract_order = NEW.primary_contract_order, login_expression = NEW.login_expression,
               clock = NEW.clock, boundary_checked_on = NEW.boundary_checked_on, search_path = NEW.search_path,
               person_match = NEW.person_match;
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._scratch(name text, columns text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass('pg_temp.' || quote_ident(name));
BEGIN
    IF rel IS NULL THEN
        EXECUTE format('CREATE TEMP TABLE %I (%s)', name, columns);
    ELSIF pg_catalog.pg_relation_size(rel) > 8 * current_setting('block_size')::int THEN
        EXECUTE format('TRUNCATE %s', rel);
    ELSE
        EXECUTE format('DELETE FROM %s', rel);
    END IF;
END
$$;

-- sql/10_config.sql

CREATE OR REPLACE FUNCTION identity_sync._check_single_expression(what text, expr text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int := length(expr);
    i int := 1;
    j int;
    depth int;
    ch text;
    tag text;
    unterminated text;
    start int;
    opened int[] := '{}';
BEGIN
    WHILE i <= n LOOP
        start := i;
        ch := substr(expr, i, 1);
        IF ch IN ('''', '"') THEN
            -- a string literal or a quoted identifier: its quote doubled is a quote inside it,
            -- and so is \' in an E'' string
            j := i + 1;
            WHILE j <= n LOOP
                IF ch = '''' AND substr(expr, j, 1) = E'\\' AND i > 1 AND lower(substr(expr, i - 1, 1)) = 'e' THEN
                    j := j + 2;
                ELSIF substr(expr, j, 2) = ch || ch THEN
                    j := j + 2;
                ELSIF substr(expr, j, 1) = ch THEN
                    EXIT;
                ELSE
                    j := j + 1;
                END IF;
            END LOOP;
            IF j > n THEN
                unterminated := CASE ch WHEN '''' THEN 'string literal' ELSE 'quoted identifier' END;
                EXIT;
            END IF;
            i := j + 1;
        ELSIF substr(expr, i, 2) = '--' THEN
            j := strpos(substr(expr, i), E'\n');
            i := CASE WHEN j = 0 THEN n + 1 ELSE i + j END;
        ELSIF substr(expr, i, 2) = '/*' THEN
            -- block comments nest
            depth := 1;
            i := i + 2;
            WHILE i <= n AND depth > 0 LOOP
                IF substr(expr, i, 2) = '/*' THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF substr(expr, i, 2) = '*/' THEN
                    depth := depth - 1;
                    i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            IF depth > 0 THEN
                unterminated := '/* comment';
                EXIT;
            END IF;
        ELSIF ch = '$' AND (i = 1 OR substr(expr, i - 1, 1) !~ '[[:alnum:]_$]')
              AND substr(expr, i) ~ '^\$([[:alpha:]_][[:alnum:]_]*)?\$' THEN
            -- a dollar-quoted string, up to its closing tag
            tag := substring(substr(expr, i) FROM '^(\$(?:[[:alpha:]_][[:alnum:]_]*)?\$)');
            j := strpos(substr(expr, i + length(tag)), tag);
            IF j = 0 THEN
                unterminated := 'dollar-quoted string';
                EXIT;
            END IF;
            i := i + length(tag) + j - 1 + length(tag);
        ELSIF ch = ';' THEN
            RAISE EXCEPTION '% must be a single SQL %', what, CASE WHEN what LIKE '%query' THEN 'query' ELSE 'expression' END
                USING ERRCODE = 'syntax_error',
                DETAIL = format('The semicolon at character %s ends it: %s', i, expr),
                HINT = CASE WHEN what LIKE '%query' THEN 'Write one query without a semicolon.'
                            ELSE 'Write one expression without a semicolon; a subquery in parentheses is one expression.' END;
        ELSIF ch = '(' THEN
            opened := opened || i;
            i := i + 1;
        ELSIF ch = ')' THEN
            -- A parenthesis it did not open would close one of ours: "x) OR (true" would
            -- change the condition it is placed in.
            IF cardinality(opened) = 0 THEN
                RAISE EXCEPTION 'unbalanced parentheses in %', what USING ERRCODE = 'syntax_error',
                    DETAIL = format('The ) at character %s closes nothing: %s', i, expr);
            END IF;
            opened := opened[1:cardinality(opened) - 1];
            i := i + 1;
        ELSE
            i := i + 1;
        END IF;
    END LOOP;
    IF unterminated IS NULL AND cardinality(opened) > 0 THEN
        RAISE EXCEPTION 'unbalanced parentheses in %', what USING ERRCODE = 'syntax_error',
            DETAIL = format('The ( at character %s is never closed: %s', opened[cardinality(opened)], expr);
    END IF;
    -- Unterminated, it would swallow the SQL we put after the expression.
    IF unterminated IS NOT NULL THEN
        RAISE EXCEPTION 'unterminated % in %', unterminated, what USING ERRCODE = 'syntax_error',
            DETAIL = format('It starts at character %s: %s', start, expr);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_user_text(what text, expr text, empty_hint text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (expr IS NULL OR btrim(expr) = '') AND empty_hint IS NULL THEN
        RAISE EXCEPTION '% is empty', what USING ERRCODE = 'invalid_parameter_value';
    ELSIF expr IS NULL OR btrim(expr) = '' THEN
        RAISE EXCEPTION '% is empty', what USING ERRCODE = 'invalid_parameter_value', HINT = empty_hint;
    END IF;
    PERFORM identity_sync._check_single_expression(what, expr);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._not_null(value anyelement, what text) RETURNS anyelement
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '% must not be null', what USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN value;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_name(what text, name text, taken boolean DEFAULT false, hint text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION '% name is empty', what USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION '% name contains a control character', what USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('The name is %s.', to_jsonb(name)),
            HINT = 'Names are one line of printable characters.';
    END IF;
    IF taken THEN
        RAISE EXCEPTION '% "%" already exists', what, name USING ERRCODE = 'duplicate_object', HINT = hint;
    END IF;
    RETURN name;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._column_type(rel regclass, col text, what text)
RETURNS regtype LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t regtype;
BEGIN
    PERFORM identity_sync._not_null(col, format('the %s column', what));
    SELECT a.atttypid::regtype INTO t
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF t IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', col, rel
            USING ERRCODE = 'undefined_column',
                  DETAIL = format('It was given as the %s column.', what),
                  HINT = format('Columns of %s: %s.', rel,
                      (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum)
                         FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped));
    END IF;
    RETURN t;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_relation(rel regclass, role text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := (SELECT CASE WHEN c.relkind IN ('r', 'p') THEN 'trigger'
                                 WHEN c.relkind IN ('v', 'm', 'f') THEN 'snapshot' END
                       FROM pg_class c WHERE c.oid = rel);
BEGIN
    PERFORM identity_sync._not_null(rel, 'the relation');
    IF NOT has_table_privilege(session_user, rel, 'SELECT') THEN
        RAISE EXCEPTION 'permission denied for relation %', rel USING ERRCODE = 'insufficient_privilege',
            HINT = 'The role registering a source must be able to read it.';
    END IF;
    IF EXISTS (SELECT FROM identity_sync.source s WHERE s.relation = rel) THEN
        RAISE EXCEPTION 'relation % is already a source', rel USING ERRCODE = 'duplicate_object',
            HINT = format('Drop it first with identity_sync.drop_source(%L).', rel::text);
    END IF;
    IF role = 'related' THEN
        IF capture IS DISTINCT FROM 'trigger' THEN
            RAISE EXCEPTION 'related source % must be a table', rel USING ERRCODE = 'wrong_object_type',
                HINT = 'Related sources are captured by statement triggers; views and foreign tables cannot carry them.';
        END IF;
        PERFORM identity_sync._check_run_as_reads(rel);
        RETURN capture;
    END IF;
    IF capture IS NULL THEN
        RAISE EXCEPTION '% cannot be a source', rel USING ERRCODE = 'wrong_object_type',
            HINT = 'Sources are tables, partitioned tables, views, materialized views or foreign tables.';
    END IF;
    PERFORM identity_sync._check_run_as_reads(rel);
    RETURN capture;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_run_as_reads(rel regclass) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._run_as();
    nsp regnamespace := (SELECT relnamespace FROM pg_class WHERE oid = rel);
BEGIN
    IF NOT has_schema_privilege(role, nsp, 'USAGE') OR NOT has_table_privilege(role, rel, 'SELECT') THEN
        RAISE EXCEPTION 'role "%" cannot read relation %', role, rel USING ERRCODE = 'insufficient_privilege',
            DETAIL = 'identity_sync reads sources and evaluates mappings, rules and other user SQL as this role (setting identity_sync.run_as), never as a superuser.',
            HINT = CASE WHEN has_schema_privilege(role, nsp, 'USAGE') THEN ''
                        ELSE format('GRANT USAGE ON SCHEMA %I TO %I; ', nsp, role) END
                   || format('GRANT SELECT ON %s TO %I;', rel, role);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_key_types(person_rel regclass, person_key text,
                                               contract_rel regclass, contract_key text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF person_rel IS NULL OR contract_rel IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT FROM %s AS c JOIN %s AS p ON c.%I = p.%I LIMIT 0', contract_rel, person_rel, contract_key, person_key);
EXCEPTION WHEN undefined_function THEN
    RAISE EXCEPTION 'the person key of % cannot be compared with the person key of %', contract_rel, person_rel
        USING ERRCODE = 'datatype_mismatch',
              DETAIL = format('%s.%I is %s, %s.%I is %s.',
                              contract_rel, contract_key, identity_sync._column_type(contract_rel, contract_key, 'person key'),
                              person_rel, person_key, identity_sync._column_type(person_rel, person_key, 'person key')),
              HINT = 'Register a view that casts one of them to the type of the other.';
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._person_source() RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source WHERE role = 'person' ORDER BY priority DESC NULLS LAST, id LIMIT 1
$$;

CREATE OR REPLACE FUNCTION identity_sync._contract_source() RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source WHERE role = 'contract' ORDER BY id LIMIT 1
$$;

CREATE OR REPLACE FUNCTION identity_sync._named_person_source(name text) RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source s WHERE s.role = 'person' AND s.name = _named_person_source.name
$$;

CREATE OR REPLACE FUNCTION identity_sync._named_contract_source(name text) RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source s WHERE s.role = 'contract' AND s.name = _named_contract_source.name
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_source_name(name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._check_name('source', name);
    IF strpos(name, ':') > 0 THEN
        RAISE EXCEPTION 'source name "%" contains a colon', name USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'A person first seen in a source other than ''default'' gets the key <source>:<key>.',
            HINT = 'Name it with letters, digits, _ or -, e.g. ''contractors''.';
    END IF;
    RETURN name;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._add_source(relation regclass, role text, capture text, key_column name DEFAULT NULL,
                                          starts_column name DEFAULT NULL, ends_column name DEFAULT NULL,
                                          affected text DEFAULT NULL, name text DEFAULT NULL, priority int DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    t record;
    msg text;
    det text;
    code text;
BEGIN
    INSERT INTO identity_sync.source (relation, role, key_column, starts_column, ends_column, affected, capture, snapshot_interval,
                                      name, priority)
    VALUES (relation, role, key_column, starts_column, ends_column, affected, capture,
            CASE WHEN capture = 'snapshot' THEN interval '1 minute' END, name, priority)
    RETURNING * INTO src;
    PERFORM identity_sync._install_capture(src.id);
    IF role <> 'related' THEN
        -- Several person sources: their records are linked to persons (15_sources.sql) before
        -- the person document, which reads the links, is compiled.
        IF identity_sync._several_sources() THEN
            PERFORM identity_sync._check_several_sources();
            PERFORM identity_sync._link_all();
            -- The person document changed shape: say which target it breaks, and how.
            FOR t IN SELECT x.id, x.name FROM identity_sync.target x ORDER BY x.id LOOP
                BEGIN
                    PERFORM identity_sync._compile(t.id);
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, code = RETURNED_SQLSTATE;
                    RAISE EXCEPTION '% of target "%" does not compile with several person sources: %',
                                    coalesce(identity_sync._blame((SELECT x FROM identity_sync.target x WHERE x.id = t.id)), 'the mappings and rules'),
                                    t.name, msg
                        USING ERRCODE = code,
                              DETAIL = coalesce(nullif(det, ''), format('Source %s makes several person sources.', relation)),
                              HINT = 'With several person sources, persons and contracts are jsonb arrays of records, each with its source '
                                     '(README, Several sources): e.g. jsonb_array_elements(contracts) AS c ... c->>''dept_no'' instead of unnest(contracts).';
                END;
            END LOOP;
        END IF;
        PERFORM identity_sync._recompile_all();
    END IF;
    PERFORM identity_sync._audit('add_' || role || '_source', relation::text, NULL, to_jsonb(src));
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_person_source(relation regclass, key text, source text DEFAULT 'default',
                                                priority int DEFAULT 100)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := identity_sync._check_relation(relation, 'person');
    other identity_sync.source := identity_sync._named_person_source(identity_sync._check_source_name(source));
BEGIN
    PERFORM identity_sync._not_null(priority, 'the priority');
    IF other.id IS NOT NULL THEN
        RAISE EXCEPTION 'a person source named "%" is already registered: %', source, other.relation
            USING ERRCODE = 'duplicate_object',
                  HINT = format('Give this one another name (source => ''...''), or drop that one first with identity_sync.drop_source(%L).',
                                other.relation::text);
    END IF;
    PERFORM identity_sync._column_type(relation, key, 'person key');
    PERFORM identity_sync._check_key_types(relation, key, (identity_sync._named_contract_source(source)).relation,
                                           (identity_sync._named_contract_source(source)).key_column);
    IF capture = 'trigger' AND NOT EXISTS (
        SELECT FROM pg_index i
         WHERE i.indrelid = relation AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
           AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = relation AND attname = key))
    THEN
        RAISE EXCEPTION 'person key "%" of % is not backed by a primary key or unique index', key, relation
            USING ERRCODE = 'invalid_table_definition',
                  DETAIL = 'Every person must be one row, found by its key.',
                  HINT = format('CREATE UNIQUE INDEX ON %s (%I);', relation, key);
    END IF;
    PERFORM identity_sync._add_source(relation, 'person', capture, key_column => key, name => source, priority => priority);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_contract_source(relation regclass, person_key text, starts text, ends text,
                                                  source text DEFAULT 'default')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := identity_sync._check_relation(relation, 'contract');
    other identity_sync.source := identity_sync._named_contract_source(identity_sync._not_null(source, 'the source name'));
    p identity_sync.source := identity_sync._named_person_source(source);
    t regtype;
    col text;
BEGIN
    -- Contracts belong to a person source by name; the default one may come first, as before.
    IF p.id IS NULL AND source <> 'default' THEN
        RAISE EXCEPTION 'person source "%" does not exist', source USING ERRCODE = 'undefined_object',
            DETAIL = 'A contract source names the person source whose persons its contracts belong to.',
            HINT = coalesce('The person sources: ' || (SELECT string_agg(format('%s (%s)', s.name, s.relation), ', ' ORDER BY s.id)
                                                       FROM identity_sync.source s WHERE s.role = 'person') || '.',
                            'Register it first with identity_sync.add_person_source(relation, key, source => ...).');
    END IF;
    IF other.id IS NOT NULL THEN
        RAISE EXCEPTION 'person source "%" already has a contract source: %', source, other.relation
            USING ERRCODE = 'duplicate_object',
                  HINT = format('There is one contract source per person source; drop it first with identity_sync.drop_source(%L), or register a view that unions your contract tables.',
                                other.relation::text);
    END IF;
    PERFORM identity_sync._column_type(relation, person_key, 'person key');
    PERFORM identity_sync._check_key_types(p.relation, p.key_column, relation, person_key);
    FOREACH t IN ARRAY ARRAY[identity_sync._column_type(relation, starts, 'starts'),
                             identity_sync._column_type(relation, ends, 'ends')] LOOP
        IF t NOT IN ('date'::regtype, 'timestamp'::regtype, 'timestamptz'::regtype) THEN
            RAISE EXCEPTION 'contract dates must be of type date or timestamp, not %', t
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = format('starts is %s, ends is %s.',
                                      identity_sync._column_type(relation, starts, 'starts'),
                                      identity_sync._column_type(relation, ends, 'ends'));
        END IF;
    END LOOP;
    IF capture = 'trigger' THEN
        -- The date-boundary check finds contracts starting or ending on a day by index.
        FOREACH col IN ARRAY ARRAY[starts, ends] LOOP
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%I)',
                           left(format('%s_%s_identity_sync', (SELECT relname FROM pg_class WHERE oid = relation), col), 63),
                           relation, col);
        END LOOP;
    END IF;
    PERFORM identity_sync._add_source(relation, 'contract', capture, key_column => person_key,
                                      starts_column => starts, ends_column => ends, name => source);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._affected_probe(relation regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('SELECT * FROM (WITH changed AS (SELECT * FROM %s LIMIT 0) ', relation)
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_related_source(relation regclass, affected text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := identity_sync._check_relation(relation, 'related');
    ncols int;
BEGIN
    IF affected IS NULL OR btrim(affected) = '' THEN
        RAISE EXCEPTION 'the affected query is empty' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Return the keys of the persons a change affects, e.g. SELECT emp_no FROM dept_emp JOIN changed USING (dept_no).';
    END IF;
    PERFORM identity_sync._check_single_expression('affected query', affected);
    -- The affected query must return exactly one column (any type casts to text).
    PERFORM identity_sync._use_user_search_path();
    ncols := identity_sync._check_query(identity_sync._affected_probe(relation) || affected || E'\n) AS a LIMIT 0',
                                        length(identity_sync._affected_probe(relation)), affected, 'affected query');
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF ncols <> 1 THEN
        RAISE EXCEPTION 'the affected query returns % columns, not one', ncols USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Return just the person key, e.g. SELECT emp_no FROM dept_emp JOIN changed USING (dept_no).';
    END IF;
    PERFORM identity_sync._add_source(relation, 'related', capture, affected => affected);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.drop_source(relation regclass)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
BEGIN
    PERFORM identity_sync._not_null(relation, 'the relation');
    SELECT * INTO src FROM identity_sync.source s WHERE s.relation = drop_source.relation;
    IF src.id IS NULL THEN
        RAISE EXCEPTION 'relation % is not a source', relation USING ERRCODE = 'undefined_object',
            HINT = 'SELECT relation, role FROM identity_sync.source; lists the sources.';
    END IF;
    PERFORM identity_sync._uninstall_capture(src.id);
    DELETE FROM identity_sync.source WHERE id = src.id;
    PERFORM identity_sync._recompile_all();
    PERFORM identity_sync._audit('drop_source', relation::text, to_jsonb(src), NULL);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.set_search_path(path text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    item text;
BEGIN
    PERFORM identity_sync._not_null(path, 'the search path');
    PERFORM set_config('search_path', path, true);   -- rejects a malformed list
    -- PostgreSQL skips a schema that does not exist; here it is a typo to report.
    FOR item IN SELECT btrim(x) FROM unnest(string_to_array(path, ',')) AS x LOOP
        CONTINUE WHEN item IN ('', '$user', 'pg_temp', 'pg_catalog');
        IF to_regnamespace(item) IS NULL THEN
            RAISE EXCEPTION 'schema % does not exist', CASE WHEN left(item, 1) = '"' THEN item ELSE '"' || item || '"' END
                USING ERRCODE = 'invalid_schema_name',
                DETAIL = format('It is named in the search path %s.', quote_literal(path));
        END IF;
    END LOOP;
    PERFORM identity_sync._set_setting('set_search_path', 'search_path', path);
    PERFORM identity_sync._recompile_all();          -- expressions must still resolve
    PERFORM identity_sync._uninstall_capture(id), identity_sync._install_capture(id)
       FROM identity_sync.source WHERE role = 'related';
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.set_primary_contract(order_by text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q text;
BEGIN
    order_by := nullif(btrim(order_by), '');
    IF order_by IS NOT NULL THEN
        PERFORM identity_sync._check_single_expression('primary contract order', order_by);
    END IF;
    PERFORM identity_sync._set_setting('set_primary_contract', 'primary_contract_order', order_by);
    -- Validate against the person document query, with the position of an error inside the
    -- order (it is the ORDER BY of the primary contract's subquery); an error rolls the change
    -- back.
    q := 'SELECT count(*) ' || identity_sync._from_clause();
    PERFORM identity_sync._use_user_search_path();
    BEGIN
        PERFORM identity_sync._check_query(q, coalesce(nullif(strpos(q, 'ORDER BY ' || order_by || ' LIMIT 1'), 0) + 8, 0),
                                           coalesce(order_by, identity_sync._primary_contract_order()), 'primary contract order');
    EXCEPTION WHEN grouping_error THEN
        RAISE EXCEPTION 'aggregate functions are not allowed in the primary contract order' USING ERRCODE = 'grouping_error',
            DETAIL = format('The order is %s.', order_by),
            HINT = 'Order by columns of contract and today, e.g. contract.to_date DESC, contract.from_date DESC.';
    END;
    PERFORM identity_sync._evaluate(q, NULL::bigint, ARRAY['primary contract order'], '{}'::text[], CURRENT_DATE, 0);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    PERFORM identity_sync._recompile_all();
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._target_options()
RETURNS TABLE (option text, kinds text[], type text, meaning text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('auth',                  '{scim,webhook}'::text[], 'auth',      'none, bearer, basic or oauth2; the secret comes from set_secret'),
           ('username',              '{scim,webhook}',       'text',      'user name for basic auth'),
           ('token_url',             '{scim,webhook}',       'text',      'OAuth2 token endpoint'),
           ('client_id',             '{scim,webhook}',       'text',      'OAuth2 client id'),
           ('scope',                 '{scim,webhook}',       'text',      'OAuth2 scope'),
           ('secret_file',           '{scim,webhook}',       'path',      'absolute path of a file the server can read holding the secret, read at each use (never in SQL text); wins over set_secret'),
           ('ca_file',               '{scim,webhook}',       'path',      'absolute path of a PEM file with the certificates of a private CA to trust'),
           ('allow_insecure_http',   '{scim,webhook}',       'boolean',   'allow plain http to a host that is not a loopback address (default false)'),
           ('max_response_bytes',    '{scim,webhook}',       'integer',   'a larger response body fails the request, default 1048576'),
           ('timeout',               '{scim,webhook}',       'interval',  'per request, default 10 s'),
           ('max_concurrency',       '{scim,webhook}',       'integer',   'requests in flight, default 16'),
           ('correlate_on',          '{scim}',               'text',      'attribute used to find an existing account before creating'),
           ('create_groups',         '{scim}',               'boolean',   'create groups that do not exist yet'),
           ('create_before',         '{scim,webhook,table}', 'interval',  'create the account this long before the first start'),
           ('enable_before',         '{scim,webhook,table}', 'interval',  'enable the account this long before a start'),
           ('disable_after',         '{scim,webhook,table}', 'interval',  'disable the account this long after the last end'),
           ('delete_after',          '{scim,webhook,table}', 'interval?', 'delete the account this long after the last end; null = never'),
           ('max_creates',           '{scim,webhook,table}', 'threshold', 'creates per plan before the target is held: a count or a percentage of accounts'),
           ('max_disables',          '{scim,webhook,table}', 'threshold', 'disables per plan before the target is held'),
           ('max_deletes',           '{scim,webhook,table}', 'threshold', 'deletes per plan before the target is held'),
           ('dry_run',               '{scim,webhook,table}', 'boolean',   'plan and record, never send'),
           ('out_of_scope',          '{scim,webhook,table}', 'out_of_scope', 'what happens to the account of a person no rule matches any more: disable (default), keep (left as it is) or delete'),
           ('quarantine_after',      '{scim,webhook,table}', 'interval',  'how long every request (5 at least) must have failed before the target is quarantined and probed, default 1 minute'),
           ('unique_max_iterations', '{scim,webhook,table}', 'integer',   'cap for is_unique iterations, default 99'),
           ('statement_timeout',     '{scim,webhook,table}', 'interval',  'bound of each evaluation of the mappings and rules, default identity_sync.statement_timeout (30 s)'),
           ('orphans',               '{scim,table}',         'orphans',   'what repair does with accounts of nobody: report (default), disable or delete'),
           ('adopt',                 '{scim,table}',         'boolean',   'the next resync scans the target first and links existing accounts by correlate_on'),
           ('reconcile_every',       '{scim,table}',         'interval?', 'the worker reconciles the target this often; null = never'),
           ('reconcile_mode',        '{scim,table}',         'reconcile_mode', 'what a scheduled reconcile does: report (default) or repair'),
           ('relation',              '{table}',              'regclass',  'the table (or foreign table) written'),
           ('key_column',            '{table}',              'text',      'its column holding the person key'),
           ('active_column',         '{table}',              'text',      'its boolean column holding the active flag'),
           ('groups_relation',       '{table}',              'regclass',  'a membership table (or foreign table) with the key column and group_column: one row per granted group'),
           ('group_column',          '{table}',              'text',      'the column of groups_relation holding the group name, default group_name')
$$;

CREATE OR REPLACE FUNCTION identity_sync._statement_timeout_ms(options jsonb) RETURNS int
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT least(ceil(extract(epoch FROM coalesce((options->>'statement_timeout')::interval,
                                                   identity_sync._statement_timeout())) * 1000),
                 2147483647)::int
$$;

CREATE OR REPLACE FUNCTION identity_sync._statement_timeout_setting(t identity_sync.target) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN t.options ? 'statement_timeout'
                THEN format('the option statement_timeout of target "%s"', t.name)
                ELSE 'identity_sync.statement_timeout' END
$$;

CREATE OR REPLACE FUNCTION identity_sync._validate_options(kind text, url text, options jsonb)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o record;
    spec record;
    v jsonb;
    valid text;
    rel regclass;
BEGIN
    PERFORM identity_sync._not_null(kind, 'the target kind');
    IF kind NOT IN ('scim', 'webhook', 'table') THEN
        RAISE EXCEPTION 'invalid target kind "%"', kind USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The kinds are scim, webhook and table.';
    END IF;
    IF jsonb_typeof(options) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'target options must be a JSON object, not %', coalesce(jsonb_typeof(options), 'null')
            USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example {"timeout": "5 s", "dry_run": true}.';
    END IF;
    IF kind IN ('scim', 'webhook') AND (url IS NULL OR url !~* '^https?://[^/]') THEN
        RAISE EXCEPTION 'a % target needs an http or https url', kind USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('url is %s.', coalesce(quote_literal(url), 'null'));
    END IF;
    -- Plain http can be overheard (tokens, personal data): loopback only, unless the target
    -- says otherwise. The worker's HTTP client refuses it too (core/src/deliver/client.rs).
    IF kind IN ('scim', 'webhook') AND url ~* '^http://'
       AND NOT coalesce((options->>'allow_insecure_http')::boolean, false)
       AND NOT identity_sync._is_loopback_url(url) THEN
        RAISE EXCEPTION 'plain http to a host that is not a loopback address is refused'
            USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Tokens and personal data would cross the network unencrypted.',
            HINT = 'Use an https url, or set the option {"allow_insecure_http": true}.';
    END IF;
    IF kind = 'table' AND url IS NOT NULL THEN
        RAISE EXCEPTION 'a table target has no url' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Name the table in the options: {"relation": "app.users", "key_column": "person_key"}.';
    END IF;
    FOR o IN SELECT * FROM jsonb_each(options) LOOP
        SELECT * INTO spec FROM identity_sync._target_options() t WHERE t.option = o.key AND kind = ANY (t.kinds);
        IF NOT FOUND THEN
            SELECT string_agg(t.option, ', ' ORDER BY t.option) INTO valid
              FROM identity_sync._target_options() t WHERE kind = ANY (t.kinds);
            RAISE EXCEPTION 'unknown option "%" for a % target', o.key, kind USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Valid options: ' || valid || '.';
        END IF;
        v := o.value;
        BEGIN
            CASE spec.type
            WHEN 'text' THEN
                IF jsonb_typeof(v) <> 'string' THEN RAISE EXCEPTION USING MESSAGE = 'a string'; END IF;
            WHEN 'auth' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('none', 'bearer', 'basic', 'oauth2') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of none, bearer, basic, oauth2';
                END IF;
            WHEN 'out_of_scope' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('disable', 'keep', 'delete') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of disable, keep, delete';
                END IF;
            WHEN 'orphans' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('report', 'disable', 'delete') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of report, disable, delete';
                END IF;
            WHEN 'reconcile_mode' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('report', 'repair') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of report, repair';
                END IF;
            WHEN 'boolean' THEN
                IF jsonb_typeof(v) <> 'boolean' THEN RAISE EXCEPTION USING MESSAGE = 'true or false'; END IF;
            WHEN 'path' THEN
                IF jsonb_typeof(v) <> 'string' OR left(v->>0, 1) <> '/' THEN
                    RAISE EXCEPTION USING MESSAGE = 'an absolute file path';
                END IF;
            WHEN 'integer' THEN
                IF jsonb_typeof(v) <> 'number' OR (v->>0)::numeric <> trunc((v->>0)::numeric) OR (v->>0)::numeric < 1 THEN
                    RAISE EXCEPTION USING MESSAGE = 'a positive whole number';
                END IF;
            WHEN 'interval', 'interval?' THEN
                IF jsonb_typeof(v) = 'null' AND spec.type = 'interval?' THEN
                    NULL;
                ELSIF jsonb_typeof(v) NOT IN ('string', 'number') THEN
                    RAISE EXCEPTION USING MESSAGE = 'an interval such as ''30 days''';
                ELSIF o.key IN ('timeout', 'quarantine_after', 'reconcile_every', 'statement_timeout')
                      AND (v->>0)::interval <= interval '0' THEN
                    -- a request, a quarantine, a schedule or an evaluation of no time at all
                    RAISE EXCEPTION USING MESSAGE = 'a positive interval such as ''30 s''';
                ELSIF (v->>0)::interval < interval '0' THEN
                    RAISE EXCEPTION USING MESSAGE = 'an interval of 0 or more such as ''30 days''';
                END IF;
            WHEN 'threshold' THEN
                PERFORM identity_sync._threshold(v);
            WHEN 'regclass' THEN
                IF jsonb_typeof(v) <> 'string' THEN RAISE EXCEPTION USING MESSAGE = 'a table name'; END IF;
                -- Resolved as the user writes it (their search_path), stored schema-qualified:
                -- the worker and our functions run with search_path = pg_catalog, pg_temp.
                PERFORM identity_sync._use_user_search_path();
                rel := (v->>0)::regclass;
                PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
                options := jsonb_set(options, ARRAY[o.key], to_jsonb(rel::text));
            END CASE;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid value for option "%": %', o.key, v::text USING ERRCODE = 'invalid_parameter_value',
                -- (what the checks above raise says what was expected; PostgreSQL's own errors,
                -- such as an invalid interval, are shown as they are)
                DETAIL = CASE WHEN SQLSTATE = 'P0001' THEN 'Expected ' || SQLERRM || '.' ELSE SQLERRM END,
                HINT = format('%s: %s.', o.key, spec.meaning);
        END;
    END LOOP;
    IF options->>'auth' = 'basic' AND options->>'username' IS NULL THEN
        RAISE EXCEPTION 'option auth basic needs username' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example {"auth": "basic", "username": "provisioning"}; the password comes from set_secret or secret_file.';
    END IF;
    IF options->>'auth' = 'oauth2' AND (options->>'token_url' IS NULL OR options->>'client_id' IS NULL) THEN
        RAISE EXCEPTION 'option auth oauth2 needs token_url and client_id' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example {"auth": "oauth2", "token_url": "https://idp.example/oauth2/token", "client_id": "identity-sync"}; the client secret comes from set_secret or secret_file.';
    END IF;
    IF options ? 'token_url' AND (options->>'token_url' !~* '^https?://[^/]'
       OR (options->>'token_url' ~* '^http://' AND NOT coalesce((options->>'allow_insecure_http')::boolean, false)
           AND NOT identity_sync._is_loopback_url(options->>'token_url'))) THEN
        RAISE EXCEPTION 'invalid value for option "token_url": %', options->'token_url' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Expected an https url, or plain http to a loopback address (or with {"allow_insecure_http": true}).';
    END IF;
    IF kind = 'scim' AND options ? 'correlate_on' THEN
        PERFORM identity_sync._check_attribute_path(options->>'correlate_on');
    END IF;
    IF kind = 'scim' AND coalesce((options->>'adopt')::boolean, false) AND options->>'correlate_on' IS NULL THEN
        RAISE EXCEPTION 'option adopt needs correlate_on' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Existing accounts are linked to persons by the value of the correlate_on attribute.',
            HINT = 'Set correlate_on too, e.g. {"adopt": true, "correlate_on": "externalId"}.';
    END IF;
    IF kind = 'table' THEN
        IF options->>'relation' IS NULL OR options->>'key_column' IS NULL THEN
            RAISE EXCEPTION 'a table target needs the options relation and key_column' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'For example {"relation": "app.users", "key_column": "person_key", "active_column": "active"}.';
        END IF;
        PERFORM identity_sync._column_type((options->>'relation')::regclass, options->>'key_column', 'key');
        IF options ? 'active_column' AND identity_sync._column_type((options->>'relation')::regclass, options->>'active_column', 'active') <> 'boolean'::regtype THEN
            RAISE EXCEPTION 'active_column "%" must be boolean', options->>'active_column' USING ERRCODE = 'datatype_mismatch',
                DETAIL = format('Column %I of %s is %s.', options->>'active_column', options->>'relation',
                                identity_sync._column_type((options->>'relation')::regclass, options->>'active_column', 'active'));
        END IF;
        IF options ? 'group_column' AND NOT options ? 'groups_relation' THEN
            RAISE EXCEPTION 'option group_column needs groups_relation' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'For example {"groups_relation": "app.user_groups", "group_column": "group_name"}.';
        END IF;
        IF options ? 'groups_relation' THEN
            -- Memberships are rows (key, group) of groups_relation, keyed like the relation.
            PERFORM identity_sync._column_type((options->>'groups_relation')::regclass, options->>'key_column', 'key_column');
            PERFORM identity_sync._column_type((options->>'groups_relation')::regclass,
                                               coalesce(options->>'group_column', 'group_name'), 'group_column');
        END IF;
    END IF;
    RETURN options;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._target(name text) RETURNS identity_sync.target
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._by_name(NULL::identity_sync.target, identity_sync._not_null(name, 'the target name'),
                                  'Create one with identity_sync.add_target().')
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_target(name text, kind text, url text DEFAULT NULL, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
BEGIN
    PERFORM identity_sync._check_name('target', name, EXISTS (SELECT FROM identity_sync.target WHERE target.name = add_target.name),
                                      'Change it with identity_sync.alter_target(), or drop it first.');
    INSERT INTO identity_sync.target (name, kind, url, options)
    VALUES (name, kind, url, identity_sync._validate_options(kind, url, coalesce(options, '{}')))
    RETURNING * INTO t;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('add_target', name, NULL, to_jsonb(t) - 'compiled');
    RAISE NOTICE 'target "%" has no rules yet, so nobody is in scope', name
        USING HINT = 'Add mappings with identity_sync.map() and rules with identity_sync.add_rule(), then start the initial sync with identity_sync.resync().';
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.alter_target(name text, url text DEFAULT NULL, options jsonb DEFAULT NULL, new_name text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(name);
    merged jsonb := t.options;
    n identity_sync.target;
BEGIN
    IF new_name IS NOT NULL THEN
        PERFORM identity_sync._check_name('target', new_name, EXISTS (SELECT FROM identity_sync.target WHERE target.name = new_name AND target.id <> t.id),
                                          'Choose another name, or drop that target first.');
    END IF;
    IF options IS NOT NULL THEN
        merged := jsonb_strip_nulls(t.options || options);
        IF options ? 'delete_after' AND options->'delete_after' = 'null' THEN
            merged := merged - 'delete_after';
        END IF;
    END IF;
    UPDATE identity_sync.target
       SET url = coalesce(alter_target.url, target.url),
           options = identity_sync._validate_options(t.kind, coalesce(alter_target.url, t.url), merged),
           name = coalesce(new_name, target.name),
           updated_at = now()
     WHERE id = t.id RETURNING * INTO n;
    PERFORM identity_sync._compile(t.id);
    -- New lifecycle intervals move moments that may already lie behind the date-boundary check
    -- (a delete_after set for leavers of last year): plan the target's accounts again now.
    -- So does a new choice for accounts out of scope.
    IF EXISTS (SELECT FROM unnest(ARRAY['create_before', 'enable_before', 'disable_after', 'delete_after', 'out_of_scope']) AS k
                WHERE t.options->k IS DISTINCT FROM n.options->k) THEN
        INSERT INTO identity_sync._dirty (person_key, target_id, op, first_at)
        SELECT a.person_key, t.id, 'lifecycle', now() FROM identity_sync.account a
         WHERE a.target_id = t.id AND a.planned_state <> 'deleted'
        ON CONFLICT DO NOTHING;
    END IF;
    -- A new membership table gets every membership the registry knows: the accounts' groups are
    -- planned again as grants (writing a membership that is there already changes nothing).
    IF n.options->>'groups_relation' IS NOT NULL
       AND (t.options->'groups_relation' IS DISTINCT FROM n.options->'groups_relation'
            OR t.options->'group_column' IS DISTINCT FROM n.options->'group_column') THEN
        UPDATE identity_sync.account a SET planned_groups = '{}', groups = '{}'
         WHERE a.target_id = t.id AND a.planned_state IN ('active', 'disabled') AND a.planned_groups <> '{}';
        INSERT INTO identity_sync._dirty (person_key, target_id, op, first_at)
        SELECT a.person_key, t.id, 'groups_relation', now() FROM identity_sync.account a
         WHERE a.target_id = t.id AND a.planned_state IN ('active', 'disabled')
        ON CONFLICT DO NOTHING;
    END IF;
    PERFORM identity_sync._audit('alter_target', n.name, to_jsonb(t) - 'compiled', to_jsonb(n) - 'compiled');
    PERFORM identity_sync._wake_at_commit();
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.drop_target(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(name);
BEGIN
    -- The worker writes these rows (events, accounts, the target) in its own order: it steps
    -- aside until this transaction ends (40_deliver.sql, src/deliver/txn.rs).
    PERFORM identity_sync._exclude_worker();
    DELETE FROM identity_sync.event WHERE target_id = t.id;
    DELETE FROM identity_sync.account WHERE target_id = t.id;
    DELETE FROM identity_sync._unique WHERE target_id = t.id;
    DELETE FROM identity_sync._plan_error WHERE target_id = t.id;
    DELETE FROM identity_sync._dirty WHERE target_id = t.id;
    DELETE FROM identity_sync._deferred WHERE target_id = t.id;
    DELETE FROM identity_sync._remote x USING identity_sync.reconcile_run r WHERE x.run_id = r.id AND r.target_id = t.id;
    DELETE FROM identity_sync._finding WHERE target_id = t.id;
    DELETE FROM identity_sync.reconcile_run WHERE target_id = t.id;
    DELETE FROM identity_sync.target WHERE id = t.id;
    PERFORM identity_sync._audit('drop_target', name, to_jsonb(t) - 'compiled', NULL);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_one_value(what text, probe text, expr text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    msg text;
    detail text;
    code text;
BEGIN
    PERFORM identity_sync._use_user_search_path();
    PERFORM identity_sync._check_expression(probe || ' (' || expr || E'\n) IS NULL LIMIT 0', length(probe) + 2, expr, what);
EXCEPTION WHEN grouping_error OR windowing_error OR feature_not_supported THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL, code = RETURNED_SQLSTATE;
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = regexp_replace(msg, ' in WHERE$', ' in the ' || what),
        DETAIL = detail,
        HINT = 'It gives one value each time it is evaluated: aggregate, or pick one row, in a subquery such as (SELECT max(c.ends) FROM unnest(contracts) AS c).';
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._probe_user_expression(what text, expr text, from_clause text, joiner text)
RETURNS regtype LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    typ regtype;
BEGIN
    PERFORM identity_sync._use_user_search_path();
    typ := identity_sync._check_expression('SELECT (' || expr || E'\n) AS v ' || from_clause || ' LIMIT 0', 8, expr, what);
    PERFORM identity_sync._check_one_value(what, 'SELECT 1 ' || from_clause || joiner, expr);
    RETURN typ;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_user_expression(t identity_sync.target, expr text, what text DEFAULT 'expression')
RETURNS regtype LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._check_user_text(what, expr);
    RETURN identity_sync._probe_user_expression(what, expr, identity_sync._from_clause(t.options), ' AND');
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.map(target text, attribute text, expression text,
                                  on_create_only boolean DEFAULT false, is_unique boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    old identity_sync.mapping;
    m identity_sync.mapping;
BEGIN
    IF attribute IS NULL OR btrim(attribute) = '' THEN
        RAISE EXCEPTION 'attribute name is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF t.kind = 'scim' THEN
        PERFORM identity_sync._check_attribute_path(attribute);
    ELSIF t.kind = 'table' THEN
        PERFORM identity_sync._column_type((t.options->>'relation')::regclass, attribute, 'mapped attribute');
    END IF;
    IF is_unique AND expression !~* '\miteration\M' THEN
        RAISE NOTICE 'unique attribute "%" does not use iteration', attribute
            USING HINT = 'Without it a taken value cannot be varied, e.g. slug(...) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '''' END.';
    END IF;
    -- A bare literal ('en-US') has no type yet; as an attribute value it is text.
    IF identity_sync._check_user_expression(t, expression, 'mapping expression') = 'unknown'::regtype THEN
        expression := format('(%s)::text', expression);
    END IF;
    SELECT * INTO old FROM identity_sync.mapping WHERE mapping.target_id = t.id AND mapping.attribute = map.attribute;
    INSERT INTO identity_sync.mapping (target_id, attribute, expression, on_create_only, is_unique)
    VALUES (t.id, attribute, expression, on_create_only, is_unique)
    ON CONFLICT ON CONSTRAINT mapping_pkey DO UPDATE
       SET expression = excluded.expression, on_create_only = excluded.on_create_only, is_unique = excluded.is_unique
    RETURNING * INTO m;
    PERFORM identity_sync._compile(t.id);
    -- A first mapping has no old value (to_jsonb of the empty record would be all nulls).
    PERFORM identity_sync._audit('map', target || '.' || attribute,
                                 CASE WHEN old.target_id IS NOT NULL THEN to_jsonb(old) - 'position' END,
                                 to_jsonb(m) - 'position');
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.unmap(target text, attribute text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    old identity_sync.mapping;
BEGIN
    DELETE FROM identity_sync.mapping WHERE mapping.target_id = t.id AND mapping.attribute = unmap.attribute
    RETURNING * INTO old;
    IF old.target_id IS NULL THEN
        RAISE EXCEPTION 'target "%" has no mapping for attribute "%"', target, attribute USING ERRCODE = 'undefined_object',
            HINT = coalesce('Its mapped attributes: ' || (SELECT string_agg(m.attribute, ', ' ORDER BY m.position)
                                                           FROM identity_sync.mapping m WHERE m.target_id = t.id) || '.',
                            'It has no mappings.');
    END IF;
    DELETE FROM identity_sync._unique WHERE _unique.target_id = t.id AND _unique.attribute = unmap.attribute;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('unmap', target || '.' || attribute, to_jsonb(old) - 'position', NULL);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_rule(target text, name text, condition text, groups text[] DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    typ regtype;
    r identity_sync.rule;
BEGIN
    PERFORM identity_sync._check_name('rule', name);
    IF EXISTS (SELECT FROM identity_sync.rule WHERE rule.target_id = t.id AND rule.name = add_rule.name) THEN
        RAISE EXCEPTION 'target "%" already has a rule "%"', target, name USING ERRCODE = 'duplicate_object',
            HINT = 'Drop it first with identity_sync.drop_rule().';
    END IF;
    IF EXISTS (SELECT FROM unnest(groups) AS g WHERE g IS NULL OR btrim(g) = '') THEN
        RAISE EXCEPTION 'group names must not be empty' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('groups is %s.', groups);
    END IF;
    typ := identity_sync._check_user_expression(t, condition, 'rule condition');
    IF typ <> 'boolean'::regtype THEN
        RAISE EXCEPTION 'rule condition must be boolean, not %', typ USING ERRCODE = 'datatype_mismatch',
            DETAIL = condition;
    END IF;
    INSERT INTO identity_sync.rule (target_id, name, condition, groups)
    VALUES (t.id, name, condition, coalesce(groups, '{}')) RETURNING * INTO r;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('add_rule', target || '.' || name, NULL, to_jsonb(r));
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.drop_rule(target text, name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    old identity_sync.rule;
BEGIN
    DELETE FROM identity_sync.rule WHERE rule.target_id = t.id AND rule.name = drop_rule.name RETURNING * INTO old;
    IF old.target_id IS NULL THEN
        RAISE EXCEPTION 'target "%" has no rule "%"', target, name USING ERRCODE = 'undefined_object',
            HINT = coalesce('Its rules: ' || (SELECT string_agg(r.name, ', ' ORDER BY r.name)
                                               FROM identity_sync.rule r WHERE r.target_id = t.id) || '.',
                            'It has no rules.');
    END IF;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('drop_rule', target || '.' || name, to_jsonb(old), NULL);
END
$$;

-- sql/15_sources.sql

CREATE OR REPLACE FUNCTION identity_sync._several_sources() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM identity_sync.source WHERE role = 'person' AND name IS DISTINCT FROM 'default')
        OR EXISTS (SELECT FROM identity_sync._person_link)
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_several_sources() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s identity_sync.source;
BEGIN
    SELECT * INTO s FROM identity_sync.source x
     WHERE x.role IN ('person', 'contract')
       AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = x.relation AND a.attname = 'source'
                      AND a.attnum > 0 AND NOT a.attisdropped)
     ORDER BY x.id LIMIT 1;
    IF s.id IS NOT NULL THEN
        RAISE EXCEPTION '% source % has a column named "source"', s.role, s.relation USING ERRCODE = 'duplicate_column',
            DETAIL = 'With several person sources, person, contract and each record of persons and contracts carry the source''s name as "source".',
            HINT = format('Register a view that renames the column, e.g. CREATE VIEW ... AS SELECT source AS origin, ... FROM %s.', s.relation);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._union_columns(role text)
RETURNS TABLE (col name, typ text, n int)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT DISTINCT ON (a.attname) a.attname, format_type(a.atttypid, a.atttypmod),
           (row_number() OVER (ORDER BY s.priority DESC NULLS LAST, s.id, a.attnum))::int
      FROM identity_sync.source s
      JOIN pg_attribute a ON a.attrelid = s.relation AND a.attnum > 0 AND NOT a.attisdropped
     WHERE s.role = _union_columns.role
     ORDER BY a.attname, s.priority DESC NULLS LAST, s.id, a.attnum
$$;

CREATE OR REPLACE FUNCTION identity_sync._records_sql(role text, linked boolean)
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s identity_sync.source;
    first identity_sync.source := identity_sync._contract_source();
    c record;
    cols text;
    branches text[] := '{}';
    from_ text;
BEGIN
    FOR s IN SELECT * FROM identity_sync.source x WHERE x.role = _records_sql.role ORDER BY x.priority DESC NULLS LAST, x.id LOOP
        cols := '';
        FOR c IN SELECT * FROM identity_sync._union_columns(role) ORDER BY n LOOP
            cols := cols || ', ' || CASE
                WHEN role = 'contract' AND c.col IN (first.starts_column, first.ends_column) THEN
                    format('t.%I::%s AS %I', CASE c.col WHEN first.starts_column THEN s.starts_column ELSE s.ends_column END, c.typ, c.col)
                WHEN EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = s.relation AND a.attname = c.col
                                AND a.attnum > 0 AND NOT a.attisdropped) THEN
                    format('t.%I::%s AS %I', c.col, c.typ, c.col)
                ELSE format('NULL::%s AS %I', c.typ, c.col) END;
        END LOOP;
        IF linked THEN
            from_ := format('(SELECT x->>0 AS source, x->>1 AS source_key FROM jsonb_array_elements(_k._links::jsonb) AS x) AS l '
                            'JOIN %s AS t ON t.%I = l.source_key::%s WHERE l.source = %L',
                            s.relation, s.key_column, identity_sync._column_type(s.relation, s.key_column, 'person key'), s.name);
            cols := cols || ', to_jsonb(t) AS _record';
        ELSE
            from_ := format('%s AS t', s.relation);
        END IF;
        branches := branches || format('SELECT %L::text AS source, t.%I::text AS _key%s%s FROM %s',
            s.name, s.key_column,
            CASE WHEN role = 'person'
                 THEN format(', %s::int AS priority, %s AS _always', s.priority,
                             CASE WHEN (identity_sync._named_contract_source(s.name)).id IS NULL THEN 'true' ELSE 'false' END)
                 ELSE '' END,
            cols, from_);
    END LOOP;
    RETURN nullif(array_to_string(branches, ' UNION ALL '), '');
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._links_of(keys text[]) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN identity_sync._several_sources() THEN ARRAY(
        SELECT coalesce((SELECT jsonb_agg(jsonb_build_array(l.source, l.source_key) ORDER BY l.source, l.source_key)
                           FROM identity_sync._person_link l WHERE l.person_key = k.k), '[]')::text
          FROM unnest(keys) WITH ORDINALITY AS k(k, o)
         ORDER BY k.o) END
$$;

CREATE OR REPLACE FUNCTION identity_sync._merge(keys text[]) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    keep text;
    other text;
BEGIN
    SELECT k INTO keep FROM unnest(keys) AS k
     ORDER BY (SELECT min(a.created_at) FROM identity_sync.account a WHERE a.person_key = k) NULLS LAST,
              (SELECT min(l.linked_at) FROM identity_sync._person_link l WHERE l.person_key = k) NULLS LAST, k
     LIMIT 1;
    FOR other IN SELECT DISTINCT k FROM unnest(keys) AS k WHERE k <> keep ORDER BY 1 LOOP
        UPDATE identity_sync._person_link SET person_key = keep WHERE person_key = other;
        IF EXISTS (SELECT FROM identity_sync.account a WHERE a.person_key = other)
           AND EXISTS (SELECT FROM identity_sync.account a WHERE a.person_key = keep) THEN
            INSERT INTO identity_sync._merge_conflict (person_key, merged_key, targets)
            SELECT keep, other, ARRAY(SELECT t.name FROM identity_sync.account a JOIN identity_sync.target t ON t.id = a.target_id
                                       WHERE a.person_key = other ORDER BY t.name)
            ON CONFLICT (merged_key) WHERE resolved_at IS NULL DO NOTHING;
            RAISE WARNING 'persons "%" and "%" are one person now, and both have accounts', keep, other
                USING DETAIL = format('"%s" keeps its accounts; those of "%s" are left as they are.', keep, other),
                      HINT = format('See identity_sync.merge_conflicts; SELECT identity_sync.resolve_merge_conflict(%L); retires them.', other);
        END IF;
        PERFORM identity_sync._audit('merge_persons', keep, to_jsonb(other), to_jsonb(keep));
    END LOOP;
    RETURN keep;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._link_new(name text, keys text[]) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._named_person_source(name);
    rule text := (SELECT person_match FROM identity_sync._settings);
    present text[];
    pairs jsonb := '[]';
    k text;
    cur text;
    found text[];
    kept text[] := '{}';
BEGIN
    IF p.id IS NULL THEN
        RETURN kept;
    END IF;
    -- The source as identity_sync.run_as (src/evaluate.rs), like every read of a source.
    PERFORM identity_sync._use_user_search_path();
    present := identity_sync._evaluate(
        format('SELECT ARRAY(SELECT t.%1$I::text FROM %2$s AS t WHERE $1 IS NULL OR t.%1$I = ANY ($1::text[]::%3$s[]))',
               p.key_column, p.relation, identity_sync._column_type(p.relation, p.key_column, 'person key')),
        NULL::text[], ARRAY[format('person source %s', p.relation)], keys);
    IF cardinality(present) > 0 AND rule IS NOT NULL THEN
        pairs := identity_sync._evaluate(format(
            'SELECT coalesce(jsonb_agg(x), ''[]'') FROM ('
            'SELECT jsonb_build_array(a._key, b.source, b._key) AS x FROM (%1$s) AS a JOIN (%1$s) AS b ON a.source <> b.source AND (%2$s'
            || E'\n) WHERE a.source = $4[1] AND a._key = ANY ($1) UNION ALL '
            'SELECT jsonb_build_array(b._key, a.source, a._key) FROM (%1$s) AS a JOIN (%1$s) AS b ON a.source <> b.source AND (%2$s'
            || E'\n) WHERE b.source = $4[1] AND b._key = ANY ($1)) AS q',
            identity_sync._records_sql('person', false), rule),
            NULL::jsonb, ARRAY['person match'], present, NULL, NULL, ARRAY[name]);
    END IF;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    FOREACH k IN ARRAY present LOOP
        cur := (SELECT l.person_key FROM identity_sync._person_link l WHERE l.source = name AND l.source_key = k);
        found := ARRAY(SELECT DISTINCT l.person_key
                         FROM jsonb_array_elements(pairs) AS x
                         JOIN identity_sync._person_link l ON l.source = x->>1 AND l.source_key = x->>2
                        WHERE x->>0 = k AND l.person_key IS DISTINCT FROM cur);
        IF cur IS NULL THEN
            INSERT INTO identity_sync._person_link (source, source_key, person_key)
            VALUES (name, k, CASE WHEN cardinality(found) > 0 THEN identity_sync._merge(found)
                                  WHEN name = 'default' THEN k ELSE name || ':' || k END)
            -- (linked meanwhile by another session: the worker's claim and a configuration call)
            ON CONFLICT DO NOTHING;
        ELSIF cardinality(found) > 0 THEN
            kept := kept || identity_sync._merge(cur || found);
        END IF;
    END LOOP;
    RETURN kept;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._link_all() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s identity_sync.source;
    kept text[] := '{}';
BEGIN
    FOR s IN SELECT * FROM identity_sync.source WHERE role = 'person' ORDER BY priority DESC NULLS LAST, id LOOP
        kept := kept || identity_sync._link_new(s.name, NULL);
    END LOOP;
    -- (a key kept by one merge and merged into another since has no links left)
    PERFORM identity_sync._replan(ARRAY(SELECT DISTINCT l.person_key FROM identity_sync._person_link l
                                         WHERE l.person_key = ANY (kept) ORDER BY 1), 'merge');
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._link_keys(source_id int, keys text[]) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    name text;
BEGIN
    SELECT * INTO src FROM identity_sync.source s WHERE s.id = source_id;
    IF src.id IS NULL THEN
        RETURN keys;   -- (a source dropped since: its keys as they are)
    END IF;
    name := CASE WHEN src.role = 'related' THEN (identity_sync._person_source()).name ELSE src.name END;
    PERFORM identity_sync._link_new(name, keys);   -- (the persons merges kept are among those returned)
    RETURN ARRAY(SELECT coalesce(l.person_key, CASE WHEN name = 'default' THEN k ELSE name || ':' || k END)
                   FROM unnest(keys) AS k
                   LEFT JOIN identity_sync._person_link l ON l.source = name AND l.source_key = k);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.set_person_match(condition text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    recs text;
    q text;
    typ regtype;
BEGIN
    condition := nullif(btrim(condition), '');
    IF condition IS NOT NULL THEN
        PERFORM identity_sync._require_person_source();
        PERFORM identity_sync._check_single_expression('person match', condition);
        recs := identity_sync._records_sql('person', false);
        q := 'SELECT (' || condition || E'\n) AS v FROM (' || recs || ') AS a, (' || recs || ') AS b LIMIT 0';
        PERFORM identity_sync._use_user_search_path();
        typ := identity_sync._check_expression(q, 8, condition, 'person match');
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        IF typ <> 'boolean'::regtype THEN
            RAISE EXCEPTION 'person match must be boolean, not %', typ USING ERRCODE = 'datatype_mismatch',
                DETAIL = condition,
                HINT = 'Compare two records a and b of different person sources, e.g. a.national_id = b.national_id.';
        END IF;
        -- It joins two records: no aggregate, window or set-returning function (PostgreSQL
        -- refuses them in a join condition, where it runs).
        q := 'SELECT 1 FROM (' || recs || ') AS a JOIN (' || recs || ') AS b ON (';
        PERFORM identity_sync._use_user_search_path();
        PERFORM identity_sync._check_expression(q || condition || E'\n) LIMIT 0', length(q) + 1, condition, 'person match');
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    END IF;
    PERFORM identity_sync._set_setting('set_person_match', 'person_match', condition);
    IF identity_sync._several_sources() THEN
        PERFORM identity_sync._link_all();
    END IF;
END
$$;

CREATE OR REPLACE VIEW identity_sync.merge_conflicts AS
SELECT c.id, c.person_key, c.merged_key, c.targets, c.detected_at, c.resolved_at, c.resolution
  FROM identity_sync._merge_conflict c;

CREATE OR REPLACE FUNCTION identity_sync.resolve_merge_conflict(merged_key text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c identity_sync._merge_conflict;
BEGIN
    PERFORM identity_sync._not_null(merged_key, 'the merged person key');
    UPDATE identity_sync._merge_conflict m SET resolved_at = now(), resolution = 'retire'
     WHERE m.merged_key = resolve_merge_conflict.merged_key AND m.resolved_at IS NULL
    RETURNING * INTO c;
    IF c.id IS NULL THEN
        RAISE EXCEPTION 'person "%" has no open merge conflict', merged_key USING ERRCODE = 'undefined_object',
            HINT = coalesce('Open conflicts: ' || (SELECT string_agg(format('%s (kept: %s)', m.merged_key, m.person_key), ', ' ORDER BY m.id)
                                                     FROM identity_sync._merge_conflict m WHERE m.resolved_at IS NULL) || '.',
                            'There is none (SELECT * FROM identity_sync.merge_conflicts;).');
    END IF;
    PERFORM identity_sync._replan(ARRAY[merged_key], 'merge_resolved');
    PERFORM identity_sync._audit('resolve_merge_conflict', merged_key, NULL, to_jsonb(c));
END
$$;

-- sql/20_capture.sql

CREATE OR REPLACE FUNCTION identity_sync._uninstall_capture(source_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := (SELECT s.relation FROM identity_sync.source s WHERE s.id = source_id AND s.capture = 'trigger');
    op text;
BEGIN
    IF rel IS NOT NULL THEN
        FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'identity_sync_capture_' || op, rel);
        END LOOP;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._all_person_keys() RETURNS text[]
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
    keys text[];
BEGIN
    IF p.id IS NULL THEN
        RETURN ARRAY(SELECT DISTINCT person_key FROM identity_sync.account);
    END IF;
    -- Several person sources (15_sources.sql): every linked person, and every holder of an
    -- account but the merged persons of open merge conflicts, whose accounts wait.
    IF identity_sync._several_sources() THEN
        RETURN ARRAY(SELECT person_key FROM identity_sync._person_link
                     UNION SELECT person_key FROM identity_sync.account
                     EXCEPT SELECT merged_key FROM identity_sync._merge_conflict WHERE resolved_at IS NULL);
    END IF;
    -- The person source as identity_sync.run_as (src/evaluate.rs): a view's functions run as
    -- that role, not as the owner of this function.
    keys := identity_sync._evaluate(format('SELECT ARRAY(SELECT %I::text FROM %s)', p.key_column, p.relation),
                                    NULL::text[], ARRAY[format('person source %s', p.relation)]);
    RETURN ARRAY(SELECT unnest(keys) UNION SELECT person_key FROM identity_sync.account);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._snapshot_source(source_id int)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    src identity_sync.source;
    hashes identity_sync._key_hash[];
    n int;
BEGIN
    SELECT * INTO src FROM identity_sync.source WHERE id = source_id;
    hashes := identity_sync._evaluate(
        format('SELECT coalesce(array_agg(ROW(q.person_key, q.hash)::identity_sync._key_hash), ''{}'') FROM ('
               'SELECT t.%I::text AS person_key, md5(string_agg(t::text, E''\n'' ORDER BY t::text))::bytea AS hash FROM %s AS t GROUP BY 1) AS q',
               src.key_column, src.relation),
        NULL::identity_sync._key_hash[], ARRAY[format('snapshot of source %s', src.relation)]);
    WITH cur AS (SELECT * FROM unnest(hashes)),
        diff AS (
            SELECT coalesce(cur.person_key, s.person_key) AS person_key, cur.hash
              FROM cur FULL JOIN (SELECT * FROM identity_sync._snapshot WHERE source_id = src.id) AS s
                ON s.person_key = cur.person_key
             WHERE cur.hash IS DISTINCT FROM s.hash),
        upd AS (
            INSERT INTO identity_sync._snapshot (source_id, person_key, hash)
            SELECT src.id, person_key, hash FROM diff WHERE hash IS NOT NULL
            ON CONFLICT (source_id, person_key) DO UPDATE SET hash = excluded.hash),
        del AS (
            DELETE FROM identity_sync._snapshot s USING diff
             WHERE s.source_id = src.id AND s.person_key = diff.person_key AND diff.hash IS NULL),
        ins AS (
            INSERT INTO identity_sync.change (source_id, op, keys)
            SELECT src.id, 'snapshot', array_agg(person_key) FROM diff HAVING count(*) > 0)
    SELECT count(*) INTO n FROM diff;
    UPDATE identity_sync.source SET snapshot_at = now() WHERE id = src.id;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.set_snapshot_interval(relation regclass, every interval)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF every IS NULL OR every <= interval '0' THEN
        RAISE EXCEPTION 'invalid snapshot interval: %', coalesce(every::text, 'null') USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Expected a positive interval such as ''1 minute''.';
    END IF;
    UPDATE identity_sync.source s SET snapshot_interval = every
     WHERE s.relation = set_snapshot_interval.relation AND s.capture = 'snapshot';
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a snapshot-captured source', relation USING ERRCODE = 'undefined_object',
            HINT = 'Only views and foreign tables are captured by snapshots.';
    END IF;
    PERFORM identity_sync._audit('set_snapshot_interval', relation::text, NULL, to_jsonb(every));
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_boundaries()
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c identity_sync.source := identity_sync._contract_source();
    n int := 0;
    today date := identity_sync._today();
    last date := (SELECT boundary_checked_on FROM identity_sync._settings);
    shifts interval[];
    end_shifts interval[];
    keys text[];
BEGIN
    IF last IS NULL OR c.id IS NULL OR today = last THEN
        UPDATE identity_sync._settings SET boundary_checked_on = today;
        RETURN 0;
    END IF;
    -- start shifts: create_before, enable_before (the account moves before the start);
    -- end shifts: disable_after, delete_after (after the inclusive last day).
    SELECT array_agg(DISTINCT s) INTO shifts FROM (
        SELECT -coalesce((options->>'create_before')::interval, '0') AS s FROM identity_sync.target
        UNION SELECT -coalesce((options->>'enable_before')::interval, '0') FROM identity_sync.target
        UNION SELECT interval '0') AS q;
    end_shifts := ARRAY(SELECT DISTINCT coalesce((options->>x)::interval, '0')
                          FROM identity_sync.target, unnest(ARRAY['disable_after', 'delete_after']) AS x
                         UNION SELECT interval '0');
    -- Each contract source as identity_sync.run_as (src/evaluate.rs), like every read of a
    -- source (several with several person sources: their keys become person keys when claimed).
    FOR c IN SELECT * FROM identity_sync.source WHERE role = 'contract' ORDER BY id LOOP
        keys := identity_sync._evaluate(format($q$
            SELECT ARRAY(
                SELECT DISTINCT c.%1$I::text FROM unnest(%5$L::interval[]) AS sh, %2$s AS c
                 WHERE c.%3$I > (%7$L::date - sh) AND c.%3$I <= (%8$L::date - sh)
                UNION
                SELECT DISTINCT c.%1$I::text FROM unnest(%6$L::interval[]) AS sh, %2$s AS c
                 WHERE c.%4$I > (%7$L::date - sh - interval '1 day') AND c.%4$I <= (%8$L::date - sh - interval '1 day')
            ) $q$, c.key_column, c.relation, c.starts_column, c.ends_column, shifts, end_shifts, last, today),
            NULL::text[], ARRAY[format('contract source %s', c.relation)]);
        IF cardinality(keys) > 0 THEN
            INSERT INTO identity_sync.change (source_id, op, keys) VALUES (c.id, 'boundary', keys);
        END IF;
        n := n + coalesce(cardinality(keys), 0);
    END LOOP;
    UPDATE identity_sync._settings SET boundary_checked_on = today;
    RETURN n;
END
$$;

CREATE OR REPLACE VIEW identity_sync.pending_changes AS
SELECT person_key,
       (array_agg(source ORDER BY at))[1] AS source,
       (array_agg(op ORDER BY at))[1] AS op,
       min(at) AS first_changed_at,
       count(*) AS changes
  FROM (SELECT k AS person_key, s.relation::text AS source, c.op, c.at
          FROM identity_sync.change c
          LEFT JOIN identity_sync.source s ON s.id = c.source_id,
               unnest(c.keys) AS k
        UNION ALL
        SELECT d.person_key, s.relation::text, d.op, d.first_at
          FROM identity_sync._dirty d
          LEFT JOIN identity_sync.source s ON s.id = d.source_id
        UNION ALL
        -- waiting for a target whose planning failed (30_plan/60_plan.sql)
        SELECT d.person_key, s.relation::text, d.op, d.first_at
          FROM identity_sync._deferred d
          LEFT JOIN identity_sync.source s ON s.id = d.source_id) AS q
 GROUP BY person_key;

CREATE OR REPLACE FUNCTION identity_sync._refuse_breaking_change(breaks text, msg text, det text, hnt text, fix text)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'this change breaks %', breaks
        USING ERRCODE = 'dependent_objects_still_exist',
              DETAIL = msg || CASE WHEN det <> '' THEN E'\n' || det ELSE '' END,
              HINT = CASE WHEN hnt <> '' THEN hnt || E'\n' ELSE '' END || fix;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._follow_source_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    old identity_sync.source;
    missing name[];
    renamed name;
    touched boolean := false;
    t record;
    ty regtype;
    what text;
    msg text;
    det text;
    hnt text;
BEGIN
    IF to_regclass('identity_sync.source') IS NULL OR NOT EXISTS (SELECT FROM identity_sync.source) THEN
        RETURN;
    END IF;
    -- The sources this command changed: the table itself, or the schema it lives in.
    FOR src IN
        SELECT s.* FROM identity_sync.source AS s
         WHERE s.id IN (SELECT s2.id
                          FROM identity_sync.source AS s2
                          JOIN pg_class AS r ON r.oid = s2.relation,
                               pg_event_trigger_ddl_commands() AS c
                         WHERE (c.classid = 'pg_class'::regclass AND c.objid = r.oid)
                            OR (c.classid = 'pg_namespace'::regclass AND c.objid = r.relnamespace))
         ORDER BY s.id
    LOOP
        touched := true;
        missing := ARRAY(SELECT col FROM unnest(ARRAY[src.key_column, src.starts_column, src.ends_column]) AS col
                          WHERE col IS NOT NULL AND NOT EXISTS (
                                SELECT FROM pg_attribute a
                                 WHERE a.attrelid = src.relation AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped));
        IF cardinality(missing) > 0 THEN
            -- RENAME COLUMN reports the renamed column by its number.
            SELECT a.attname INTO renamed
              FROM pg_event_trigger_ddl_commands() AS c
              JOIN pg_attribute AS a ON a.attrelid = c.objid AND a.attnum = c.objsubid
             WHERE c.classid = 'pg_class'::regclass AND c.objid = src.relation AND c.objsubid > 0
               AND c.object_type LIKE '%column';
            IF renamed IS NULL OR cardinality(missing) > 1 THEN
                -- (sql_drop refuses drops; this is a column gone some other way)
                RAISE EXCEPTION 'the % of identity_sync source % does not exist any more: "%"',
                                identity_sync._registered_column_role(src, missing[1]), src.relation, missing[1]
                    USING ERRCODE = 'dependent_objects_still_exist',
                          HINT = format('Undo the change, or drop the source first (SELECT identity_sync.drop_source(%L);).', src.relation::text);
            END IF;
            old := src;
            src.key_column := CASE WHEN src.key_column = missing[1] THEN renamed ELSE src.key_column END;
            src.starts_column := CASE WHEN src.starts_column = missing[1] THEN renamed ELSE src.starts_column END;
            src.ends_column := CASE WHEN src.ends_column = missing[1] THEN renamed ELSE src.ends_column END;
            UPDATE identity_sync.source
               SET key_column = src.key_column, starts_column = src.starts_column, ends_column = src.ends_column
             WHERE id = src.id;
            PERFORM identity_sync._uninstall_capture(src.id);
            PERFORM identity_sync._install_capture(src.id);
            PERFORM identity_sync._audit('follow_rename', src.relation::text, to_jsonb(old), to_jsonb(src));
            RAISE NOTICE 'identity_sync follows the rename: the % of source % is now "%"',
                         identity_sync._registered_column_role(old, missing[1]), src.relation, renamed;
        END IF;
        IF src.role = 'contract' THEN
            FOREACH renamed IN ARRAY ARRAY[src.starts_column, src.ends_column] LOOP
                ty := identity_sync._column_type(src.relation, renamed, 'contract date');
                IF ty NOT IN ('date'::regtype, 'timestamp'::regtype, 'timestamptz'::regtype) THEN
                    RAISE EXCEPTION 'column "%" of % must stay of type date or timestamp, not %', renamed, src.relation, ty
                        USING ERRCODE = 'datatype_mismatch',
                              DETAIL = format('It is the %s of the identity_sync contract source.',
                                              identity_sync._registered_column_role(src, renamed)),
                              HINT = format('Undo the change, or drop the source first (SELECT identity_sync.drop_source(%L);).', src.relation::text);
                END IF;
            END LOOP;
        END IF;
    END LOOP;

    -- Targets are compiled against the sources' names, columns and types: compile them again.
    IF touched THEN
        FOR t IN SELECT id, name FROM identity_sync.target ORDER BY id LOOP
            BEGIN
                PERFORM identity_sync._compile(t.id);
            -- (what identity_sync.run_as may not read is a matter of grants, not of this change:
            -- a restore runs DDL before it restores the grants; planning names it if it stays)
            EXCEPTION WHEN insufficient_privilege THEN
                NULL;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
                PERFORM identity_sync._refuse_breaking_change(format('the mappings or rules of target "%s"', t.name), msg, det, hnt,
                    'Change the mappings and rules that use it in the same transaction as the schema change '
                    '(identity_sync.unmap and map, drop_rule and add_rule), or undo the change.');
            END;
        END LOOP;
        -- So is self-service: the login expression and the products' owners conditions.
        BEGIN
            msg := NULL;
            IF (SELECT login_expression FROM identity_sync._settings) IS NOT NULL
               AND (identity_sync._person_source()).id IS NOT NULL THEN
                what := 'the self-service login expression';
                PERFORM identity_sync._use_user_search_path();
                PERFORM identity_sync._check_expression(
                    'SELECT (' || (SELECT login_expression FROM identity_sync._settings) || E'\n) AS v FROM '
                        || (identity_sync._person_source()).relation::text || ' AS person LIMIT 0',
                    8, (SELECT login_expression FROM identity_sync._settings), 'login expression');
                PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            END IF;
            FOR t IN SELECT name, owners FROM identity_sync.product ORDER BY id LOOP
                what := format('the owners condition of product "%s"', t.name);
                PERFORM identity_sync._check_owners(t.owners);
            END LOOP;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;   -- (grants, not this change: see above)
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
            PERFORM identity_sync._refuse_breaking_change(what, msg, det, hnt,
                'Change it in the same transaction as the schema change (identity_sync.set_login, alter_product), or undo the change.');
        END;
    END IF;

    -- Every related source's affected query runs inside each write to its table: it must still
    -- work, whichever table this command changed.
    FOR src IN SELECT * FROM identity_sync.source WHERE role = 'related' AND capture = 'trigger' ORDER BY id LOOP
        BEGIN
            PERFORM identity_sync._use_user_search_path();
            PERFORM identity_sync._check_query(
                identity_sync._affected_probe(src.relation) || src.affected || E'\n) AS a LIMIT 0',
                length(identity_sync._affected_probe(src.relation)), src.affected, 'affected query');
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;   -- (grants, not this change: see above)
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
            PERFORM identity_sync._refuse_breaking_change(format('the affected query of related source %s', src.relation), msg, det, hnt,
                format('Register the source again with a query that works, in the same transaction as the schema change '
                       '(SELECT identity_sync.drop_source(%L); SELECT identity_sync.add_related_source(%L, <affected query>);), '
                       'or undo the change.', src.relation::text, src.relation::text));
        END;
    END LOOP;
END
$$;

-- sql/30_plan/00_person.sql

CREATE OR REPLACE FUNCTION identity_sync._contract_aggregates(opts jsonb, contracts_expr text, starts name, ends name, also text)
RETURNS text LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format(
            'SELECT %1$s AS contracts, '
            || '(coalesce(bool_or(c.%2$I::date - %4$s::interval <= today AND (%7$s::interval IS NULL OR c.%3$I IS NULL OR today <= c.%3$I::date + %7$s::interval)), false) OR %8$s) AS _exists, '
            || '(coalesce(bool_or(c.%2$I::date - %5$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %6$s::interval)), false) OR %8$s) AS _enabled, '
            -- A new account only for a person who is (about to be) working: not for a leaver of
            -- years ago whom a first sync meets.
            || '(coalesce(bool_or(c.%2$I::date - %4$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %6$s::interval)), false) OR %8$s) AS _creatable ',
            contracts_expr, starts, ends,
            quote_literal(coalesce(opts->>'create_before', '0')), quote_literal(coalesce(opts->>'enable_before', '0')),
            quote_literal(coalesce(opts->>'disable_after', '0')),
            CASE WHEN opts->>'delete_after' IS NULL THEN 'NULL' ELSE quote_literal(opts->>'delete_after') END, also)
$$;

CREATE OR REPLACE FUNCTION identity_sync._from_clause_several(opts jsonb)
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c identity_sync.source := identity_sync._contract_source();
    recs text := identity_sync._records_sql('person', true);
    crecs text := identity_sync._records_sql('contract', true);
    pcols text := (SELECT string_agg(format('r.%I', u.col), ', ' ORDER BY u.n) FROM identity_sync._union_columns('person') AS u);
    ccols text := (SELECT string_agg(format('contract.%I', u.col), ', ' ORDER BY u.n) FROM identity_sync._union_columns('contract') AS u);
    sql text;
BEGIN
    PERFORM identity_sync._require_person_source();
    sql := format('FROM unnest($1::text[], $4::text[]) AS _k(person_key, _links) CROSS JOIN LATERAL (SELECT $2::date AS today, $3::int AS iteration) AS _p '
                  'CROSS JOIN LATERAL (SELECT r.source, %2$s FROM (%1$s) AS r ORDER BY r.priority DESC, r.source, r._key LIMIT 1) AS person '
                  'CROSS JOIN LATERAL (SELECT jsonb_agg(jsonb_build_object(''source'', r.source) || r._record ORDER BY r.priority DESC, r.source, r._key) AS persons, '
                  'bool_or(r._always) AS _always FROM (%1$s) AS r) AS _ps ',
                  recs, pcols);
    IF c.id IS NULL THEN
        sql := sql || 'CROSS JOIN LATERAL (SELECT NULL::record AS contract, ''[]''::jsonb AS contracts, true AS _exists, true AS _enabled, true AS _creatable) AS _c ';
    ELSE
        sql := sql || format('CROSS JOIN LATERAL (%s FROM (%s) AS c) AS _cs ',
                             identity_sync._contract_aggregates(opts,
                                 format('coalesce(jsonb_agg(jsonb_build_object(''source'', c.source) || c._record ORDER BY c.%1$I, c.%2$I, c.source), ''[]'')',
                                        c.starts_column, c.ends_column),
                                 c.starts_column, c.ends_column, 'coalesce(_ps._always, false)'), crecs)
            || format('LEFT JOIN LATERAL (SELECT contract.source, %s FROM (%s) AS contract ORDER BY %s LIMIT 1) AS contract ON true ',
                      ccols, crecs, identity_sync._primary_contract_order());
    END IF;
    RETURN sql || 'WHERE true';
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._from_clause(opts jsonb DEFAULT '{}')
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._require_person_source();
    c identity_sync.source := identity_sync._contract_source();
    create_before text := quote_literal(coalesce(opts->>'create_before', '0'));
    enable_before text := quote_literal(coalesce(opts->>'enable_before', '0'));
    disable_after text := quote_literal(coalesce(opts->>'disable_after', '0'));
    delete_after  text := CASE WHEN opts->>'delete_after' IS NULL THEN 'NULL' ELSE quote_literal(opts->>'delete_after') END;
    sql text;
BEGIN
    IF identity_sync._several_sources() THEN
        RETURN identity_sync._from_clause_several(opts);
    END IF;
    sql := format('FROM %s AS person CROSS JOIN LATERAL (SELECT $2::date AS today, $3::int AS iteration) AS _p ', p.relation);
    IF c.id IS NULL THEN
        sql := sql || 'CROSS JOIN LATERAL (SELECT NULL::record AS contract, NULL::record[] AS contracts, true AS _exists, true AS _enabled, true AS _creatable) AS _c ';
    ELSE
        sql := sql || format(
            'LEFT JOIN LATERAL (SELECT array_agg(c ORDER BY c.%2$I, c.%3$I) AS contracts, '
            || 'coalesce(bool_or(c.%2$I::date - %5$s::interval <= today AND (%8$s::interval IS NULL OR c.%3$I IS NULL OR today <= c.%3$I::date + %8$s::interval)), false) AS _exists, '
            || 'coalesce(bool_or(c.%2$I::date - %6$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %7$s::interval)), false) AS _enabled, '
            -- A new account only for a person who is (about to be) working: not for a leaver of
            -- years ago whom a first sync meets.
            || 'coalesce(bool_or(c.%2$I::date - %5$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %7$s::interval)), false) AS _creatable '
            || 'FROM %1$s AS c WHERE c.%4$I = person.%9$I) AS _cs ON true ',
            c.relation, c.starts_column, c.ends_column, c.key_column,
            create_before, enable_before, disable_after, delete_after, p.key_column)
            || identity_sync._primary_contract_join('person', 'contract');
    END IF;
    RETURN sql || 'WHERE ' || identity_sync._person_key_in('person', 1);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._person_key_expr() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN identity_sync._several_sources() THEN '_k.person_key'
                ELSE format('person.%I::text', (identity_sync._person_source()).key_column) END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_person_key(person_key text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
    keytype regtype;
BEGIN
    PERFORM identity_sync._not_null(person_key, 'the person key');
    IF p.id IS NULL OR identity_sync._several_sources() THEN
        RETURN;   -- _from_clause says what is missing; with several sources keys are text
    END IF;
    keytype := identity_sync._column_type(p.relation, p.key_column, 'person key');
    BEGIN
        EXECUTE format('SELECT $1::%s', keytype) USING person_key;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'invalid person key "%"', person_key USING ERRCODE = 'invalid_text_representation',
            DETAIL = format('The person key column %I of %s is of type %s.', p.key_column, p.relation, keytype);
    END;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.person(person_key text)
RETURNS jsonb LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    doc jsonb;
    has_contracts boolean := (identity_sync._contract_source()).id IS NOT NULL;
    several boolean := identity_sync._several_sources();
    q text;
BEGIN
    PERFORM identity_sync._check_person_key(person_key);
    q := format('SELECT jsonb_build_object(''person_key'', %s, ''person'', to_jsonb(person), %s'
                   '''contract'', %s, ''contracts'', %s, ''active'', %s, ''today'', today) %s',
                   identity_sync._person_key_expr(),
                   CASE WHEN several THEN '''persons'', persons, ' ELSE '' END,
                   CASE WHEN has_contracts THEN 'CASE WHEN contract IS NULL THEN NULL ELSE to_jsonb(contract) END' ELSE 'NULL::jsonb' END,
                   CASE WHEN has_contracts THEN 'coalesce(to_jsonb(contracts), ''[]'')' ELSE '''[]''::jsonb' END,
                   CASE WHEN has_contracts THEN '_enabled' ELSE 'true' END,
                   identity_sync._from_clause());
    PERFORM identity_sync._use_user_search_path();
    -- As identity_sync.run_as, read-only (src/evaluate.rs): the sources may be views, and the
    -- primary contract order is user SQL.
    doc := identity_sync._evaluate(q, NULL::jsonb, ARRAY['person document'], ARRAY[person_key], identity_sync._today(), 0,
                                   identity_sync._links_of(ARRAY[person_key]));
    RETURN doc;
END
$$;

-- sql/30_plan/10_compile.sql

CREATE OR REPLACE FUNCTION identity_sync._compiled_expressions(target_id int)
RETURNS TABLE (n int, kind text, name text, expression text, groups text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (row_number() OVER (ORDER BY x.k, x.rule_name, x.position))::int, x.kind, x.name, x.expression, x.groups
      FROM (SELECT 1 AS k, r.name AS rule_name, NULL::int AS position, 'rule' AS kind, r.name, r.condition AS expression, r.groups
              FROM identity_sync.rule r WHERE r.target_id = _compiled_expressions.target_id
            UNION ALL
            SELECT 2, NULL, m.position, 'mapping', m.attribute, m.expression, NULL
              FROM identity_sync.mapping m WHERE m.target_id = _compiled_expressions.target_id) AS x
$$;

CREATE OR REPLACE FUNCTION identity_sync._compiled_names(target_id int) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY['person document'] || ARRAY(SELECT format('%s "%s"', e.kind, e.name)
                                               FROM identity_sync._compiled_expressions(target_id) AS e ORDER BY e.n)
$$;

CREATE OR REPLACE FUNCTION identity_sync._compile(target_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
    conditions text[] := '{}';
    rules text[] := '{}';
    groups text := '';
    attrs text := '''{}''::jsonb';
    r record;
    pairs text[] := '{}';
    sql text;
BEGIN
    SELECT * INTO t FROM identity_sync.target WHERE id = target_id;
    IF (identity_sync._person_source()).id IS NULL THEN
        UPDATE identity_sync.target SET compiled = NULL WHERE id = target_id;
        RETURN;
    END IF;
    -- Each expression is preceded by its marker, so that an error or a timeout names it. A
    -- rule's condition is evaluated once per person (into _q._r), then read for its name and
    -- for its groups: written out for each, an EXISTS ran twice, and the planner chose a hash
    -- of the whole table for one of the two copies (bench/run: 12 ms of a 33 ms batch).
    FOR r IN SELECT * FROM identity_sync._compiled_expressions(t.id) ORDER BY n LOOP
        IF r.kind = 'rule' THEN
            conditions := conditions || format('CASE WHEN identity_sync._at(%s) THEN (%s%s) END',
                                               r.n, r.expression, E'\n');
            rules := rules || format('CASE WHEN _q._r[%s] THEN %L::text END', cardinality(conditions), r.name);
            groups := groups || format(' || CASE WHEN _q._r[%s] THEN %L::text[] END', cardinality(conditions), r.groups);
        ELSE
            pairs := pairs || format('%L, CASE WHEN identity_sync._at(%s) THEN to_jsonb((%s%s)) END',
                                     r.name, r.n, r.expression, E'\n');
            IF cardinality(pairs) = 50 THEN
                attrs := attrs || ' || jsonb_build_object(' || array_to_string(pairs, ', ') || ')';
                pairs := '{}';
            END IF;
        END IF;
    END LOOP;
    IF cardinality(pairs) > 0 THEN
        attrs := attrs || ' || jsonb_build_object(' || array_to_string(pairs, ', ') || ')';
    END IF;
    -- The inner query evaluates every expression once per person (OFFSET 0: not pulled up,
    -- which would copy each condition into every place that reads it); its last column marks
    -- the row's expressions done (what runs until the next row's first expression is the
    -- person document).
    sql := format('SELECT _q.person_key, array_remove(ARRAY[%s]::text[], NULL) AS rules, '
                  'ARRAY(SELECT DISTINCT g FROM unnest(''{}''::text[]%s) AS g WHERE g IS NOT NULL ORDER BY g) AS groups, '
                  '_q.attributes, _q.exists_now, _q.enabled_now, _q.creatable_now '
                  'FROM (SELECT %s AS person_key, ARRAY[%s]::boolean[] AS _r, %s AS attributes, _exists AS exists_now, '
                  '_enabled AS enabled_now, CASE WHEN identity_sync._at(0) THEN _creatable END AS creatable_now ',
                  array_to_string(rules, ', '), groups,
                  identity_sync._person_key_expr(), array_to_string(conditions, ', '), attrs)
           || identity_sync._from_clause(t.options) || ' OFFSET 0) AS _q';
    -- Parse and plan it once now, as the worker will run it (_evaluate_compiled), so a broken
    -- configuration never reaches the worker.
    t.compiled := sql;
    PERFORM identity_sync._evaluate_compiled(t, '{}', CURRENT_DATE, 0);
    -- (unchanged text: no write, so recompiling after DDL on a source locks no target row; a
    -- target whose planning failed is tried again at once with a new configuration)
    UPDATE identity_sync.target
       SET compiled = sql, plan_retry_at = CASE WHEN plan_retry_at IS NOT NULL THEN now() END
     WHERE id = t.id AND compiled IS DISTINCT FROM sql;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._evaluate_compiled(t identity_sync.target, keys text[], today date, iteration int)
RETURNS identity_sync._desired_row[] LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._use_user_search_path();
    RETURN identity_sync._evaluate(
        format('SELECT coalesce(array_agg(ROW(%1$s)::identity_sync._desired_row), ''{}'') FROM (%2$s) AS q',
               identity_sync._compiled_columns(), t.compiled),
        NULL::identity_sync._desired_row[], identity_sync._compiled_names(t.id), keys, today, iteration,
        identity_sync._links_of(keys),
        timeout_ms => identity_sync._statement_timeout_ms(t.options),
        setting => identity_sync._statement_timeout_setting(t));
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._blame(t identity_sync.target) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT * FROM identity_sync._compiled_expressions(t.id) ORDER BY n LOOP
        BEGIN
            PERFORM identity_sync._check_user_expression(t, e.expression, e.kind);
        EXCEPTION WHEN OTHERS THEN
            RETURN format('%s "%s"', e.kind, e.name);
        END;
    END LOOP;
    RETURN NULL;
END
$$;

-- sql/30_plan/20_desired.sql

CREATE OR REPLACE FUNCTION identity_sync._desired(t identity_sync.target, keys text[], today date, record_errors boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k text;
    m record;
    cap int := coalesce((t.options->>'unique_max_iterations')::int, 99);
    conflicted text[];
    it int;
    loops int;
    culprit text;
    detail text;
    hint text;
    -- The compiled query's columns, by name (_compiled_columns, 30_plan/10_compile.sql).
    ins text := format('INSERT INTO pg_temp._is_desired (%1$s) SELECT %1$s FROM unnest($1) AS q',
                       identity_sync._compiled_columns());
BEGIN
    PERFORM identity_sync._scratch('_is_desired',
        'person_key text PRIMARY KEY, rules text[], groups text[], attributes jsonb, '
        'exists_now boolean, enabled_now boolean, creatable_now boolean, iteration int NOT NULL DEFAULT 0, error text');
    IF t.compiled IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        EXECUTE ins USING identity_sync._evaluate_compiled(t, keys, today, 0);
    EXCEPTION WHEN query_canceled THEN
        -- Timed out (or cancelled): persons one by one would each take as long.
        RAISE;
    WHEN OTHERS THEN
        IF identity_sync._failed_at() < 0 THEN
            -- Before any expression ran (a permission check as the executor started): the same
            -- for every person; named by checking the expressions one by one.
            GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
            culprit := identity_sync._blame(t);
            PERFORM identity_sync._raise(SQLSTATE, coalesce(culprit || ': ', '') || SQLERRM, detail, hint);
        END IF;
        -- One person's data broke the batch (say a subquery returned two rows): evaluate
        -- persons one by one so that only that person fails.
        FOREACH k IN ARRAY keys LOOP
            BEGIN
                EXECUTE ins USING identity_sync._evaluate_compiled(t, ARRAY[k], today, 0);
            EXCEPTION WHEN query_canceled THEN
                RAISE;
            WHEN OTHERS THEN
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
                UPDATE pg_temp._is_desired d
                   SET attributes = d.attributes || jsonb_build_object(m.attribute, q.attributes->m.attribute), iteration = it
                  FROM unnest(identity_sync._evaluate_compiled(
                           t, ARRAY(SELECT x.person_key FROM pg_temp._is_desired x
                                     WHERE x.person_key = ANY (conflicted) AND x.iteration + 1 = it),
                           today, it)) AS q
                 WHERE q.person_key = d.person_key;
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

-- sql/30_plan/30_diff.sql

CREATE OR REPLACE FUNCTION identity_sync._diff(t identity_sync.target, keys text[], today date)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Attributes sent at creation only never count as changed.
    create_only text[] := ARRAY(SELECT attribute FROM identity_sync.mapping
                                 WHERE target_id = t.id AND on_create_only);
    -- The account of a person no rule matches any more (or who is gone from HR): disabled
    -- (default), kept as it is (no event at all until a rule matches again), or deleted.
    out_of_scope text := coalesce(t.options->>'out_of_scope', 'disable');
BEGIN
    PERFORM identity_sync._scratch('_is_plan',
        'person_key text PRIMARY KEY, in_scope boolean, rules text[], has_account boolean, '
        'planned_state text, want_state text, attributes jsonb, changed jsonb, previous jsonb, '
        'groups text[], to_grant text[], to_revoke text[], seq bigint, events jsonb, '
        'n_events int, has_update boolean');

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
               -- An orphan (reconcile, option orphans) is retired: disabled, or deleted.
               coalesce(d.exists_now, CASE WHEN a.orphan THEN t.options->>'orphans' IS DISTINCT FROM 'delete'
                                           ELSE t.options->>'delete_after' IS NULL END) AS exists_now,
               coalesce(d.enabled_now, false) AS enabled_now,
               coalesce(d.creatable_now, false) AS creatable_now,
               -- out_of_scope = keep: an account out of scope (not an orphan, which reconcile
               -- retires) is left exactly as planned so far.
               (out_of_scope = 'keep' AND a.person_key IS NOT NULL AND a.planned_state <> 'deleted'
                AND NOT a.orphan AND NOT coalesce(d.rules <> '{}', false)) AS kept
         -- OFFSET 0 keeps each lateral step computed once per person instead of being
         -- flattened into (and recomputed by) every expression that uses it.
         OFFSET 0) AS b
     CROSS JOIN LATERAL (
        SELECT CASE
                 WHEN b.kept THEN b.planned_state
                 WHEN b.has_account THEN
                   CASE WHEN NOT b.exists_now THEN 'deleted'
                        WHEN b.in_scope AND b.enabled_now THEN 'active'
                        WHEN NOT b.in_scope AND NOT a.orphan AND out_of_scope = 'delete' THEN 'deleted'
                        ELSE 'disabled' END
                 WHEN b.in_scope AND b.exists_now AND b.creatable_now THEN
                   CASE WHEN b.enabled_now THEN 'active' ELSE 'disabled' END
               END AS want_state OFFSET 0) AS w
     CROSS JOIN LATERAL (
        SELECT b.in_scope, b.rules, b.has_account, b.planned_state, w.want_state, b.seq,
               CASE WHEN b.kept THEN a.planned_attributes ELSE coalesce(d.attributes, '{}') END AS attributes,
               coalesce(ch.changed, '{}') AS changed,
               coalesce(ch.previous, '{}') AS previous,
               g.groups,
               ARRAY(SELECT x FROM unnest(g.groups) AS x
                      WHERE NOT (b.has_account AND x = ANY (a.planned_groups)) ORDER BY x) AS to_grant,
               ARRAY(SELECT x FROM unnest(CASE WHEN b.has_account THEN a.planned_groups ELSE '{}' END) AS x
                      WHERE x <> ALL (g.groups) ORDER BY x) AS to_revoke
          FROM (SELECT CASE WHEN b.kept THEN a.planned_groups
                            WHEN w.want_state IN ('active', 'disabled') AND b.in_scope
                            THEN ARRAY(SELECT DISTINCT x FROM unnest(coalesce(d.groups, '{}')
                                         || identity_sync._granted_groups(t.id, k.person_key, b.enabled_now)) AS x ORDER BY x)
                            ELSE '{}'::text[] END AS groups OFFSET 0) AS g
          LEFT JOIN LATERAL (
            SELECT jsonb_object_agg(e.key, e.value) AS changed,
                   jsonb_object_agg(e.key, a.planned_attributes->e.key) AS previous
              FROM jsonb_each(d.attributes) AS e
             WHERE b.has_account AND NOT b.kept
               AND a.planned_attributes IS DISTINCT FROM d.attributes  -- fast path
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

-- sql/30_plan/50_apply.sql

CREATE OR REPLACE FUNCTION identity_sync._apply_done(ids bigint[], remote_ids text[], statuses int[])
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

-- sql/30_plan/60_plan.sql

CREATE OR REPLACE FUNCTION identity_sync._committed_at(xid xid8) RETURNS timestamptz
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(identity_sync._commit_time(xid::text::bigint),
                    CASE WHEN current_setting('track_commit_timestamp')::boolean
                         THEN pg_xact_commit_timestamp(xid::xid) END)
$$;

CREATE OR REPLACE FUNCTION identity_sync._claim_changes(max_rows int)
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

CREATE OR REPLACE FUNCTION identity_sync._record_causes(plan_id bigint) RETURNS void
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

CREATE OR REPLACE FUNCTION identity_sync._plan_run(keys text[], target_id int, op text, at timestamptz)
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

CREATE OR REPLACE FUNCTION identity_sync._lock_target_plans(target_id int) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pg_advisory_xact_lock('identity_sync.target'::pg_catalog.regclass::oid::int, target_id)
$$;

CREATE OR REPLACE FUNCTION identity_sync._plan_target(t identity_sync.target, keys text[], plan_id bigint)
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

CREATE OR REPLACE FUNCTION identity_sync._plan_failed(t identity_sync.target, message text)
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

CREATE OR REPLACE FUNCTION identity_sync._defer(target_id int)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._deferred (target_id, person_key, source_id, op, first_at, change_ids)
    SELECT DISTINCT ON (b.person_key) _defer.target_id, b.person_key, b.source_id, b.op, b.first_at, b.change_ids
      FROM pg_temp._is_batch b WHERE b.target_id IN (0, _defer.target_id)
     ORDER BY b.person_key, b.first_at
    ON CONFLICT (target_id, person_key) DO NOTHING
$$;

CREATE OR REPLACE FUNCTION identity_sync._undefer(batch_size int)
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

CREATE OR REPLACE FUNCTION identity_sync._plan(batch_size int)
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

-- sql/40_deliver.sql

CREATE OR REPLACE FUNCTION identity_sync._exclude_worker_on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._exclude_worker();
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._worker_start() RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync._count_outcomes(target_id int, delivered bigint, failed bigint)
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

CREATE OR REPLACE FUNCTION identity_sync._count_done() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._count_outcomes(d.target_id, count(*), 0)
       FROM pg_temp._is_done d GROUP BY d.target_id;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._claim_horizon() RETURNS timestamptz
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
                     AND current_setting('track_activities')::boolean
                     AND NOT EXISTS (SELECT FROM pg_prepared_xacts x WHERE x.database = current_database())
                THEN (SELECT min(a.xact_start) FROM pg_stat_get_activity(NULL) AS a
                       WHERE a.datid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                         AND a.backend_type IS DISTINCT FROM 'autovacuum worker') END
$$;

CREATE OR REPLACE FUNCTION identity_sync._claim_from(target_id int) RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((nullif(current_setting('identity_sync_claim.from', true), '')::jsonb ->> target_id::text)::timestamptz,
                    '-infinity')
$$;

CREATE OR REPLACE FUNCTION identity_sync._claim(kinds text[], max_events int)
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

CREATE OR REPLACE FUNCTION identity_sync._breaker(e identity_sync.event, error text, target_level boolean)
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

CREATE OR REPLACE FUNCTION identity_sync._record(event_id bigint, outcome text, remote_id text DEFAULT NULL,
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

CREATE OR REPLACE FUNCTION identity_sync._record_many(outcomes identity_sync._outcome[])
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

CREATE OR REPLACE FUNCTION identity_sync._uniqueness_conflict(e identity_sync.event, error text, taken text[] DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION identity_sync._table_values_taken(t identity_sync.target, e identity_sync.event)
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

CREATE OR REPLACE FUNCTION identity_sync._apply_table_event(t identity_sync.target, e record)
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

CREATE OR REPLACE FUNCTION identity_sync._deliver_tables(max_events int)
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

-- sql/45_housekeeping.sql

CREATE OR REPLACE FUNCTION identity_sync._next_due_ms() RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
BEGIN
    RETURN greatest(0, (extract(epoch FROM (least(
               -- per target, so that the event_due index answers, from where this session's
               -- claims start (no event is due before: _claim_from, 40_deliver.sql)
               (SELECT min(d.due) FROM identity_sync.target t
                 CROSS JOIN LATERAL (SELECT min(e.due_at) AS due FROM identity_sync.event e
                                      WHERE e.target_id = t.id AND e.state IN ('pending', 'retry')
                                        AND e.due_at >= identity_sync._claim_from(t.id)) AS d
                 WHERE NOT t.paused),
               (SELECT min(snapshot_at + snapshot_interval) FROM identity_sync.source WHERE capture = 'snapshot'),
               -- the next attempt of a target whose planning failed (30_plan/60_plan.sql)
               (SELECT min(t.plan_retry_at) FROM identity_sync.target t
                 WHERE EXISTS (SELECT FROM identity_sync._deferred d WHERE d.target_id = t.id)),
               date_trunc('day', now()) + interval '1 day') - now())) * 1000)::bigint);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._housekeeping() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    retention interval := identity_sync._event_retention();   -- NULL: keep forever
BEGIN
    PERFORM identity_sync._snapshot_source(s.id) FROM identity_sync.source s
      WHERE s.capture = 'snapshot' AND (s.snapshot_at IS NULL OR s.snapshot_at + s.snapshot_interval <= now());
    PERFORM identity_sync._check_boundaries();
    PERFORM identity_sync._expire_grants();
    IF EXISTS (SELECT FROM identity_sync.notification n WHERE n.on_event = 'grant_expiring') THEN
        PERFORM identity_sync._notify_expiring();
    END IF;
    PERFORM identity_sync._reconcile_schedule();
    IF retention IS NOT NULL THEN
        -- At most 10,000 events a round (one a second): a day of heavy traffic ageing out at
        -- once would otherwise be one long transaction of the worker, every HR commit waiting
        -- behind it, and a mass of dead rows at once; the oldest go first (index event_done).
        DELETE FROM identity_sync.event WHERE id = ANY (ARRAY(
            SELECT e.id FROM identity_sync.event e
             WHERE e.state = 'done' AND e.done_at < now() - retention
             ORDER BY e.done_at LIMIT 10000));
        -- A plan run, its causes and the changes they name stay while an event of the plan
        -- does (a failed event keeps its story); the attempts of an event stay with it.
        DELETE FROM identity_sync.plan_run p
         WHERE p.started_at < now() - retention
           AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.plan_id = p.id);
        DELETE FROM identity_sync.change_log c
         WHERE c.claimed_at < now() - retention
           AND NOT EXISTS (SELECT FROM identity_sync.plan_cause pc WHERE pc.change_id = c.id);
        DELETE FROM identity_sync._attempt a
         WHERE a.recorded_at < now() - retention
           AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.id = a.event_id);
        DELETE FROM identity_sync._plan_count WHERE at < now() - interval '1 hour';
        -- Notices sent or skipped go like delivered events; failed ones stay for an operator.
        DELETE FROM identity_sync.notice x
         WHERE x.id = ANY (ARRAY(SELECT y.id FROM identity_sync.notice y
                                  WHERE y.state IN ('sent', 'skipped') AND y.created_at < now() - retention
                                  ORDER BY y.created_at LIMIT 10000));
        -- Reconcile runs like events, but the latest finished one of each target stays: the
        -- drift and orphans views read it.
        DELETE FROM identity_sync.reconcile_run r
         WHERE r.finished_at < now() - retention AND r.id IS DISTINCT FROM identity_sync._latest_reconcile(r.target_id);
    END IF;
END
$$;

-- sql/48_reconcile.sql

CREATE OR REPLACE FUNCTION identity_sync._reconcile_target(target text, mode text)
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

CREATE OR REPLACE FUNCTION identity_sync._reconcile_schedule() RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync._reconcile_expected(run_id bigint) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(a.remote_id), '{}')
      FROM identity_sync.reconcile_run r
      JOIN identity_sync.account a ON a.target_id = r.target_id
     WHERE r.id = _reconcile_expected.run_id AND a.remote_id IS NOT NULL
       AND a.state IN ('active', 'disabled') AND NOT a.orphan
$$;

CREATE OR REPLACE FUNCTION identity_sync._reconcile_page(run_id bigint, accounts jsonb) RETURNS boolean
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

CREATE OR REPLACE FUNCTION identity_sync._reconcile_groups(run_id bigint, members jsonb) RETURNS boolean
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

CREATE OR REPLACE FUNCTION identity_sync._reconcile_scan_table(run_id bigint) RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync._reconcile_compare(run_id bigint) RETURNS void
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

CREATE OR REPLACE FUNCTION identity_sync._reconcile_plan(run_id bigint, batch_size int) RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync._adopt(t identity_sync.target) RETURNS int
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

-- sql/50_status.sql

CREATE OR REPLACE VIEW identity_sync.status AS
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

CREATE OR REPLACE FUNCTION identity_sync._end_hold(t identity_sync.target, action text, detail jsonb) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE identity_sync.target SET held = NULL, released_at = now() WHERE id = t.id;
    SELECT identity_sync._audit(action, t.name, t.held, detail);
$$;

CREATE OR REPLACE FUNCTION identity_sync.release(target text, kind text DEFAULT NULL) RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync.discard(target text) RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync.retry(target_or_event text) RETURNS int
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

CREATE OR REPLACE FUNCTION identity_sync.sync_person(person_key text, target text DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION identity_sync.wait_idle(timeout interval DEFAULT '30 seconds') RETURNS boolean
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

CREATE OR REPLACE FUNCTION identity_sync.preview(person_key text, target text DEFAULT NULL)
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

CREATE OR REPLACE VIEW identity_sync.attempts AS
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

CREATE OR REPLACE FUNCTION identity_sync._cause_kind(op text, source_id int) RETURNS text
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

CREATE OR REPLACE FUNCTION identity_sync.trace(person_key text)
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

-- sql/52_metrics.sql

CREATE OR REPLACE VIEW identity_sync.metrics AS
SELECT m.name, m.labels, m.value FROM (
    SELECT 'identity_sync_worker_up'::text AS name, '{}'::jsonb AS labels,
           -- (worker_status() reads the worker's pid in shared memory: no pg_stat_activity
           -- privilege needed)
           (SELECT (w.state = 'running')::int::float8 FROM identity_sync.worker_status() AS w) AS value
    UNION ALL
    SELECT 'identity_sync_planner_dirty_persons', '{}',
           ((SELECT count(*) FROM identity_sync._dirty)
            + (SELECT coalesce(sum(cardinality(c.keys)), 0) FROM identity_sync.change c))::float8
    UNION ALL
    SELECT 'identity_sync_planner_oldest_change_seconds', '{}',
           coalesce(extract(epoch FROM now() - least((SELECT min(c.at) FROM identity_sync.change c),
                                                     (SELECT min(d.first_at) FROM identity_sync._dirty d))), 0)::float8
    UNION ALL
    SELECT 'identity_sync_queue_events', jsonb_build_object('target', t.name, 'state', s.state),
           coalesce((SELECT q.n FROM (SELECT e.state, count(*) AS n FROM identity_sync.event e
                                       WHERE e.target_id = t.id AND e.state <> 'done' GROUP BY e.state) AS q
                      WHERE q.state = s.state), 0)::float8
      FROM identity_sync.target t
     CROSS JOIN unnest(ARRAY['pending', 'sending', 'retry', 'failed', 'held']) AS s(state)
    UNION ALL
    SELECT 'identity_sync_target_' || x.k, jsonb_build_object('target', t.name), x.v
      FROM identity_sync.target t
      LEFT JOIN identity_sync._delivery_stats ds ON ds.target_id = t.id
     CROSS JOIN LATERAL (VALUES
        ('held', (t.held IS NOT NULL)::int::float8),
        ('quarantined', (t.quarantined_at IS NOT NULL)::int::float8),
        ('paused', t.paused::int::float8),
        ('plan_errors', (SELECT count(*) FROM identity_sync._plan_error pe WHERE pe.target_id = t.id)::float8),
        ('oldest_pending_seconds',
         coalesce(extract(epoch FROM now() - (SELECT min(e.created_at) FROM identity_sync.event e
                                                WHERE e.target_id = t.id AND e.state <> 'done')), 0)::float8),
        ('last_success_timestamp_seconds', extract(epoch FROM ds.last_success)::float8),
        ('delivered_total', coalesce(ds.delivered, 0)::float8),
        ('failed_attempts_total', coalesce(ds.failed_attempts, 0)::float8)) AS x(k, v)
    UNION ALL
    SELECT 'identity_sync_delivery_latency_seconds',
           jsonb_build_object('target', t.name, 'quantile', q.quantile::text), q.value
      FROM identity_sync.target t
     CROSS JOIN LATERAL (
        -- from the earliest cause of the event's plan: the commit of the HR change, or when a
        -- resync, reconcile or configuration change asked for it (plan_run.caused_at)
        SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]::float8[]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM e.done_at - coalesce(p.caused_at, e.created_at))::float8) AS ps
          FROM identity_sync.event e LEFT JOIN identity_sync.plan_run p ON p.id = e.plan_id
         WHERE e.state = 'done' AND e.done_at > now() - interval '5 minutes' AND e.target_id = t.id
           AND e.attempts > 0 AND e.last_error IS NULL) AS l
     CROSS JOIN LATERAL unnest(ARRAY[0.5, 0.9, 0.99]::float8[], l.ps) AS q(quantile, value)
) AS m
WHERE m.value IS NOT NULL;

-- sql/55_notify.sql

CREATE OR REPLACE FUNCTION identity_sync._notification_events()
RETURNS TABLE (name text, about_person boolean, meaning text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('create', true, 'an account was planned to be created (per target, or all)'),
           ('update', true, 'an account''s attributes were planned to change'),
           ('enable', true, 'an account was planned to be enabled'),
           ('disable', true, 'an account was planned to be disabled'),
           ('delete', true, 'an account was planned to be deleted'),
           ('request_pending', true, 'a self-service request waits for its owners (person: the requester)'),
           ('request_decided', true, 'a self-service request was approved or denied (person: the requester)'),
           ('grant_expiring', true, 'an approved grant expires within the option lead_time (default 7 days)'),
           ('target_held', false, 'a threshold held a target (one notice per hold)'),
           ('target_quarantined', false, 'a target whose every request failed was quarantined (alias target_failing)'),
           ('plan_errors', false, 'planning a target failed (the first failure of a streak)')
$$;

CREATE OR REPLACE FUNCTION identity_sync._notification_options()
RETURNS TABLE (name text, channels text[], type text, meaning text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('target', '{mail,webhook}'::text[], 'text', 'only events of this target (account events, holds, quarantines, plan errors, requests for its products)'),
           ('digest', '{mail,webhook}', 'interval', 'collect a recipient''s notices of this rule into one message per period'),
           ('dry_run', '{mail,webhook}', 'boolean', 'also notify account events of dry-run targets (default false)'),
           ('lead_time', '{mail,webhook}', 'interval', 'grant_expiring: how long before the expiry (default 7 days)'),
           ('smtp_url', '{mail}', 'text', 'the SMTP relay: smtp://host:port (loopback only), smtp://host:587?tls=required (STARTTLS), smtps://host:465 (implicit TLS); default identity_sync.smtp_url'),
           ('from', '{mail}', 'text', 'the From address; default identity_sync.smtp_from'),
           ('url', '{webhook}', 'text', 'the incoming webhook (Slack, Teams) to POST to'),
           ('secret_file', '{mail,webhook}', 'text', 'mail: the SMTP password (the user is the one in smtp_url); webhook: a whsec_ signing key'),
           ('timeout', '{mail,webhook}', 'interval', 'per message, default 10 s'),
           ('max_concurrency', '{mail,webhook}', 'integer', 'messages in flight for this relay or webhook, default 4')
$$;

CREATE OR REPLACE FUNCTION identity_sync._validate_notification_options(channel text, on_event text, options jsonb)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o record;
    d record;
BEGIN
    IF options IS NULL OR jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'notification options must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('options is %s.', coalesce(options::text, 'NULL'));
    END IF;
    FOR o IN SELECT e.key, e.value, d2.channels, d2.type FROM jsonb_each(options) AS e
               LEFT JOIN identity_sync._notification_options() AS d2 ON d2.name = e.key LOOP
        IF o.type IS NULL OR NOT channel = ANY (o.channels) THEN
            RAISE EXCEPTION 'unknown option "%" for a % notification', o.key, channel USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Valid options: ' || (SELECT string_agg(x.name, ', ' ORDER BY x.name)
                                              FROM identity_sync._notification_options() x WHERE channel = ANY (x.channels)) || '.';
        END IF;
        BEGIN
            CASE o.type
                WHEN 'interval' THEN
                    IF jsonb_typeof(o.value) <> 'string' OR (o.value->>0)::interval <= interval '0' THEN
                        RAISE EXCEPTION 'not a positive interval';
                    END IF;
                WHEN 'boolean' THEN
                    IF jsonb_typeof(o.value) <> 'boolean' THEN
                        RAISE EXCEPTION 'not a boolean';
                    END IF;
                WHEN 'integer' THEN
                    IF jsonb_typeof(o.value) <> 'number' OR (o.value->>0)::numeric <> trunc((o.value->>0)::numeric)
                       OR (o.value->>0)::numeric < 1 THEN
                        RAISE EXCEPTION 'not a whole number of 1 or more';
                    END IF;
                ELSE
                    IF jsonb_typeof(o.value) <> 'string' OR btrim(o.value->>0) = '' THEN
                        RAISE EXCEPTION 'not a non-empty string';
                    END IF;
            END CASE;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid value for notification option "%": %', o.key, o.value USING ERRCODE = 'invalid_parameter_value',
                DETAIL = format('It must be %s.', CASE o.type WHEN 'interval' THEN 'a positive interval such as ''1 hour'''
                                                             WHEN 'boolean' THEN 'true or false'
                                                             WHEN 'integer' THEN 'a whole number of 1 or more'
                                                             ELSE 'a non-empty string' END);
        END;
    END LOOP;
    IF options ? 'lead_time' AND on_event <> 'grant_expiring' THEN
        RAISE EXCEPTION 'option "lead_time" is for grant_expiring notifications only' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'dry_run' AND on_event NOT IN ('create', 'update', 'enable', 'disable', 'delete') THEN
        RAISE EXCEPTION 'option "dry_run" is for account events only' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Account events: create, update, enable, disable, delete.';
    END IF;
    IF channel = 'webhook' AND NOT options ? 'url' THEN
        RAISE EXCEPTION 'a webhook notification needs the option "url"' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The incoming webhook of the chat channel, e.g. {"url": "https://hooks.slack.com/services/..."}.';
    END IF;
    IF options ? 'url' AND options->>'url' !~* '^https?://' THEN
        RAISE EXCEPTION 'option "url" must be an http or https URL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'smtp_url' AND options->>'smtp_url' !~* '^smtps?://[^/?#]+' THEN
        RAISE EXCEPTION 'option "smtp_url" must be an smtp:// or smtps:// URL' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'e.g. smtps://relay.example:465 or smtp://relay.example:587?tls=required; the password goes in secret_file.';
    END IF;
    IF options ? 'smtp_url' AND options->>'smtp_url' ~ '^[^:]+://[^/@]*:[^/@]*@' THEN
        RAISE EXCEPTION 'option "smtp_url" must not hold a password' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Put the user in the URL (smtps://user@relay.example) and the password in a file named by secret_file.';
    END IF;
    IF options ? 'secret_file' AND options->>'secret_file' !~ '^/' THEN
        RAISE EXCEPTION 'option "secret_file" must be an absolute path' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN options;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notice_from(on_event text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ctx constant text := 'CROSS JOIN LATERAL (SELECT _v.o AS _ord, _v.x->''event'' AS event, _v.x->''account'' AS account, '
                         '_v.x->''request'' AS request, _v.x->''target'' AS target '
                         'FROM (SELECT _u.t::jsonb AS x, _u.o FROM unnest($4::text[]) WITH ORDINALITY AS _u(t, o)) AS _v %s) AS _ctx ';
    f text;
    w text;
BEGIN
    IF NOT (SELECT e.about_person FROM identity_sync._notification_events() e WHERE e.name = on_event) THEN
        RETURN 'FROM (SELECT $2::date AS today, $3::int AS _it, $1::text[] AS _keys) AS _p ' || format(ctx, '');
    END IF;
    f := identity_sync._from_clause();
    w := 'WHERE ' || identity_sync._person_key_in('person', 1);
    IF right(f, length(w)) <> w THEN
        RAISE EXCEPTION 'internal error: the person document does not end with its key condition' USING ERRCODE = 'internal_error';
    END IF;
    RETURN left(f, length(f) - length(w))
        || format(ctx, 'WHERE _v.x->>''person_key'' = ' || identity_sync._person_key_expr()) || w;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_notice_expression(on_event text, expr text, what text)
RETURNS regtype LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f text := identity_sync._notice_from(on_event);
BEGIN
    PERFORM identity_sync._check_user_text(what, expr);
    RETURN identity_sync._probe_user_expression(what, expr, f, CASE WHEN (SELECT e.about_person FROM identity_sync._notification_events() e
                                                                          WHERE e.name = on_event) THEN ' AND' ELSE ' WHERE' END);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notice_query(n identity_sync.notification) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('SELECT coalesce(array_agg(ROW(_ctx._ord, to_jsonb((%s%s)), (%s%s)::text, (%s%s)::text)::identity_sync._notice_row), ''{}'') %s',
                  n.recipients, E'\n', n.subject, E'\n', n.body, E'\n', identity_sync._notice_from(n.on_event))
$$;

CREATE OR REPLACE FUNCTION identity_sync._notification(name text) RETURNS identity_sync.notification
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._by_name(NULL::identity_sync.notification, identity_sync._not_null(name, 'the notification name'),
                                  'Create one with identity_sync.add_notification().')
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_notification(name text, on_event text, recipients text, subject text, body text,
                                               channel text DEFAULT 'mail', options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    typ regtype;
    ev text := lower(btrim(on_event));
BEGIN
    PERFORM identity_sync._check_name('notification', name, EXISTS (SELECT FROM identity_sync.notification x WHERE x.name = add_notification.name),
                                      'Drop it first with identity_sync.drop_notification().');
    IF ev = 'target_failing' THEN
        ev := 'target_quarantined';
    END IF;
    IF ev IS NULL OR NOT EXISTS (SELECT FROM identity_sync._notification_events() e WHERE e.name = ev) THEN
        RAISE EXCEPTION 'unknown notification event "%"', on_event USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Events: ' || (SELECT string_agg(e.name, ', ') FROM identity_sync._notification_events() e) || ', target_failing.';
    END IF;
    IF channel IS NULL OR channel NOT IN ('mail', 'webhook') THEN
        RAISE EXCEPTION 'unknown notification channel "%"', channel USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Channels: mail, webhook.';
    END IF;
    options := identity_sync._validate_notification_options(channel, ev, options);
    n.name := name;
    n.on_event := ev;
    n.channel := channel;
    n.options := options - 'target';
    IF options ? 'target' THEN
        n.target_id := (identity_sync._target(options->>'target')).id;
    END IF;
    typ := identity_sync._check_notice_expression(ev, recipients, 'recipients expression');
    IF typ NOT IN ('unknown'::regtype, 'text'::regtype, 'character varying'::regtype, 'text[]'::regtype, 'character varying[]'::regtype) THEN
        RAISE EXCEPTION 'recipients expression must be text or text[], not %', typ USING ERRCODE = 'datatype_mismatch',
            DETAIL = recipients,
            HINT = 'Give an address (person.email), an array of them (ARRAY[''ops@example.com'', ''oncall@example.com'']), or NULL to skip.';
    END IF;
    -- (typed: a bare literal such as 'ops@example.com' is text in a select list, but not inside
    -- the to_jsonb() of the rule's query)
    n.recipients := format(CASE WHEN typ IN ('text[]'::regtype, 'character varying[]'::regtype) THEN '(%s)::text[]'
                                ELSE '(%s)::text' END, recipients || E'\n');
    FOREACH typ IN ARRAY ARRAY[identity_sync._check_notice_expression(ev, subject, 'subject expression'),
                               identity_sync._check_notice_expression(ev, body, 'body expression')] LOOP
        IF typ NOT IN ('text'::regtype, 'character varying'::regtype, 'unknown'::regtype) THEN
            RAISE EXCEPTION 'subject and body expressions must be text, not %', typ USING ERRCODE = 'datatype_mismatch',
                HINT = 'Format values as text, e.g. format(''%s left'', person.last_name) or to_char(today, ''YYYY-MM-DD'').';
        END IF;
    END LOOP;
    n.subject := subject;
    n.body := body;
    INSERT INTO identity_sync.notification (name, on_event, target_id, recipients, subject, body, channel, options)
    VALUES (n.name, n.on_event, n.target_id, n.recipients, n.subject, n.body, n.channel, n.options)
    RETURNING * INTO n;
    PERFORM identity_sync._audit('add_notification', name, NULL, to_jsonb(n));
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.drop_notification(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification := identity_sync._notification(name);
BEGIN
    -- (its notices go with it: an unsent one would otherwise be sent by a rule that is gone)
    DELETE FROM identity_sync.notification x WHERE x.id = n.id;
    PERFORM identity_sync._audit('drop_notification', name, to_jsonb(n), NULL);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._has_notifications(events text[], target_id int) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM identity_sync.notification n
                    WHERE n.on_event = ANY (events)
                      AND (n.target_id IS NULL OR n.target_id = _has_notifications.target_id))
$$;

CREATE OR REPLACE FUNCTION identity_sync._notice_target(target_id int) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object('id', t.id, 'name', t.name, 'kind', t.kind, 'url', t.url,
                                                'held', t.held, 'quarantined_at', t.quarantined_at,
                                                'quarantine_reason', t.quarantine_reason, 'plan_error', t.plan_error))
      FROM identity_sync.target t WHERE t.id = target_id
$$;

CREATE OR REPLACE FUNCTION identity_sync._notice_eval(q text, names text[], keys text[], contexts text[],
                                           OUT rows identity_sync._notice_row[], OUT error text, OUT timed_out boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    timed_out := false;
    PERFORM identity_sync._use_user_search_path();
    rows := identity_sync._evaluate(q, NULL::identity_sync._notice_row[], names, keys, identity_sync._today(), 0, contexts);
EXCEPTION WHEN query_canceled THEN
    IF NOT identity_sync._timed_out() THEN
        RAISE;   -- cancelled from outside: not ours to swallow
    END IF;
    error := SQLERRM;
    timed_out := true;
WHEN OTHERS THEN
    error := SQLERRM;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify(n identity_sync.notification, contexts jsonb[], held boolean DEFAULT false)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q text := identity_sync._notice_query(n);
    got identity_sync._notice_row[] := '{}';
    res record;
    names text[] := ARRAY[format('notification "%s"', n.name)];
    keys text[] := ARRAY(SELECT DISTINCT c->>'person_key' FROM unnest(contexts) AS c WHERE c->>'person_key' IS NOT NULL);
    texts text[] := ARRAY(SELECT c::text FROM unnest(contexts) WITH ORDINALITY AS x(c, o) ORDER BY o);
    period interval := (n.options->>'digest')::interval;
    failures jsonb[] := '{}';
    i int;
    written int;
BEGIN
    IF cardinality(contexts) = 0 THEN
        RETURN 0;
    END IF;
    res := identity_sync._notice_eval(q, names, keys, texts);
    IF res.error IS NULL THEN
        got := coalesce(res.rows, '{}');
    ELSIF res.timed_out OR cardinality(contexts) = 1 THEN
        failures := ARRAY(SELECT jsonb_build_object('ord', g.k, 'error', res.error)
                            FROM generate_series(1, cardinality(contexts)) AS g(k));
    ELSE
        -- One context's data broke the query (a subquery with two rows): one by one, so that only
        -- its notice fails.
        FOR i IN 1 .. cardinality(contexts) LOOP
            res := identity_sync._notice_eval(q, names, array_remove(ARRAY[contexts[i]->>'person_key'], NULL), ARRAY[texts[i]]);
            IF res.error IS NULL THEN
                got := got || ARRAY(SELECT ROW(i, x.recipients, x.subject, x.body)::identity_sync._notice_row
                                      FROM unnest(res.rows) AS x);
            ELSE
                failures := failures || jsonb_build_object('ord', i, 'error', res.error);
            END IF;
        END LOOP;
    END IF;

    WITH r AS (
        SELECT x.ord, x.recipients, x.subject, x.body, contexts[x.ord] AS ctx,
               ARRAY(SELECT DISTINCT btrim(a) FROM jsonb_array_elements_text(
                         CASE jsonb_typeof(x.recipients) WHEN 'array' THEN x.recipients
                                                         WHEN 'string' THEN jsonb_build_array(x.recipients)
                                                         ELSE '[]' END) AS a
                      WHERE btrim(a) <> '') AS addrs
          FROM unnest(got) AS x),
    why AS (
        -- skipped: no recipient; failed: the evaluation failed; skipped too: no such person
        SELECT r.ctx, 'skipped' AS state,
               CASE WHEN r.recipients IS NULL OR jsonb_typeof(r.recipients) = 'null'
                    THEN 'the recipients expression gave NULL' ELSE 'the recipients expression gave no address' END AS error
          FROM r WHERE cardinality(r.addrs) = 0
        UNION ALL
        SELECT contexts[(f->>'ord')::int], 'failed', f->>'error' FROM unnest(failures) AS f
        UNION ALL
        SELECT c.ctx, 'skipped', 'the person is not in the person source'
          FROM unnest(contexts) WITH ORDINALITY AS c(ctx, o)
         WHERE c.ctx->>'person_key' IS NOT NULL
           AND NOT EXISTS (SELECT FROM r WHERE r.ord = c.o)
           AND NOT EXISTS (SELECT FROM unnest(failures) AS f WHERE (f->>'ord')::int = c.o)),
    noted AS (
        INSERT INTO identity_sync.notice (notification_id, target_id, persons, about, state, last_error)
        SELECT n.id, (w.ctx->>'target_id')::int, array_remove(ARRAY[w.ctx->>'person_key'], NULL),
               ARRAY[w.ctx->>'about'], w.state, w.error
          FROM why w
        RETURNING 1),
    each AS (
        SELECT r.ctx, a AS recipient, r.subject, r.body FROM r, unnest(r.addrs) AS a),
    plain AS (
        INSERT INTO identity_sync.notice (notification_id, target_id, persons, about, recipient, subject, body, state)
        SELECT n.id, (e.ctx->>'target_id')::int, array_remove(ARRAY[e.ctx->>'person_key'], NULL),
               ARRAY[e.ctx->>'about'], e.recipient, e.subject, e.body, CASE WHEN held THEN 'held' ELSE 'pending' END
          FROM each e WHERE period IS NULL
        RETURNING 1),
    -- A digest: one message per recipient, collecting until its period is over.
    collected AS (
        INSERT INTO identity_sync.notice AS x (notification_id, target_id, persons, about, recipient, subject, body,
                                               items, digest, due_at, state)
        SELECT n.id, min((e.ctx->>'target_id')::int),
               array_remove(array_agg(DISTINCT e.ctx->>'person_key'), NULL), array_agg(e.ctx->>'about'),
               e.recipient, min(e.subject), string_agg(e.body, E'\n\n----\n\n'), count(*), NOT held, now() + period,
               CASE WHEN held THEN 'held' ELSE 'pending' END
          FROM each e WHERE period IS NOT NULL
         GROUP BY e.recipient
        ON CONFLICT (notification_id, recipient) WHERE digest AND state = 'pending' AND attempts = 0
        DO UPDATE SET items = x.items + excluded.items,
                      body = x.body || E'\n\n----\n\n' || excluded.body,
                      persons = ARRAY(SELECT DISTINCT p FROM unnest(x.persons || excluded.persons) AS p),
                      about = x.about || excluded.about
        RETURNING 1)
    SELECT (SELECT count(*) FROM plain) + (SELECT count(*) FROM collected) INTO written;
    IF written > 0 THEN
        PERFORM identity_sync._wake_at_commit();
    END IF;
    RETURN written;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify_safely(n identity_sync.notification, contexts jsonb[], held boolean DEFAULT false)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN identity_sync._notify(n, contexts, held);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'identity_sync: notification "%" failed: %', n.name, SQLERRM
        USING DETAIL = 'Nothing else is affected; its notices of this occasion are not written.';
    RETURN 0;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify_event(on_event text, target_id int, contexts jsonb[])
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    total int := 0;
BEGIN
    FOR n IN SELECT * FROM identity_sync.notification x
              WHERE x.on_event = _notify_event.on_event
                AND (x.target_id IS NULL OR x.target_id = _notify_event.target_id)
              ORDER BY x.id LOOP
        total := total + identity_sync._notify_safely(n, contexts);
    END LOOP;
    RETURN total;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify_events(t identity_sync.target, event_ids bigint[], dry boolean, held boolean)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    target_ctx jsonb := identity_sync._notice_target(t.id);
    total int := 0;
BEGIN
    FOR n IN SELECT * FROM identity_sync.notification x
              WHERE x.on_event IN ('create', 'update', 'enable', 'disable', 'delete')
                AND (x.target_id IS NULL OR x.target_id = t.id)
                AND (NOT dry OR coalesce((x.options->>'dry_run')::boolean, false))
              ORDER BY x.id LOOP
        total := total + identity_sync._notify_safely(n, ARRAY(
            SELECT jsonb_build_object(
                       'person_key', e.person_key, 'target_id', t.id, 'about', 'event ' || e.id,
                       'event', jsonb_build_object('id', e.id, 'kind', e.kind, 'seq', e.seq, 'state', e.state,
                                                   'target', t.name, 'person_key', e.person_key, 'plan_id', e.plan_id,
                                                   'payload', e.payload,
                                                   'attributes', coalesce(e.payload->'attributes', a.planned_attributes),
                                                   'dry_run', dry),
                       'account', jsonb_build_object('remote_id', a.remote_id, 'state', a.state,
                                                     'planned_state', a.planned_state,
                                                     'attributes', a.planned_attributes, 'groups', to_jsonb(a.planned_groups)),
                       'target', target_ctx)
              FROM identity_sync.event e
              LEFT JOIN identity_sync.account a ON a.target_id = e.target_id AND a.person_key = e.person_key
             WHERE e.id = ANY (event_ids) AND e.kind = n.on_event
             ORDER BY e.id), held);
    END LOOP;
    RETURN total;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._release_notices(target_id int, released bigint[]) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE identity_sync.notice x SET state = 'pending', due_at = now()
     WHERE x.target_id = _release_notices.target_id AND x.state = 'held'
       AND x.about && ARRAY(SELECT 'event ' || r FROM unnest(released) AS r);
    DELETE FROM identity_sync.notice x
     WHERE x.target_id = _release_notices.target_id AND x.state = 'held'
       AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.target_id = x.target_id AND e.state = 'held'
                         AND 'event ' || e.id = ANY (x.about));
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify_target(on_event text, target_id int, about text, detail jsonb)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT identity_sync._has_notifications(ARRAY[on_event], target_id) THEN
        RETURN 0;
    END IF;
    RETURN identity_sync._notify_event(on_event, target_id, ARRAY[jsonb_build_object(
        'person_key', NULL, 'target_id', target_id, 'about', about,
        'event', jsonb_build_object('kind', on_event) || coalesce(detail, '{}'),
        'target', identity_sync._notice_target(target_id))]);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notice_request(r identity_sync.request) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.product;
BEGIN
    SELECT * INTO p FROM identity_sync.product x WHERE x.id = r.product_id;
    RETURN jsonb_build_object(
               'person_key', r.person_key, 'target_id', p.target_id, 'about', 'request ' || r.id,
               'request', jsonb_strip_nulls(jsonb_build_object(
                   'id', r.id, 'product', p.name, 'description', p.description, 'groups', to_jsonb(p.groups),
                   'target', (SELECT t.name FROM identity_sync.target t WHERE t.id = p.target_id),
                   'requester', r.person_key, 'requested_by', r.requested_by,
                   'reason', r.reason, 'state', r.state, 'requested_at', r.requested_at,
                   'decided_at', r.decided_at, 'expires_at', r.expires_at,
                   'owners', to_jsonb(identity_sync._owners(p, r.person_key)))),
               'target', identity_sync._notice_target(p.target_id));
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify_request(on_event text, r identity_sync.request, extra jsonb DEFAULT '{}')
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target_id int := (SELECT p.target_id FROM identity_sync.product p WHERE p.id = r.product_id);
    ctx jsonb;
BEGIN
    IF NOT identity_sync._has_notifications(ARRAY[on_event], target_id) THEN
        RETURN 0;
    END IF;
    ctx := identity_sync._notice_request(r);
    ctx := jsonb_set(ctx, '{request}', (ctx->'request') || coalesce(extra, '{}'));
    RETURN identity_sync._notify_event(on_event, target_id, ARRAY[ctx]);
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._notify_expiring() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    total int := 0;
BEGIN
    FOR n IN SELECT * FROM identity_sync.notification x WHERE x.on_event = 'grant_expiring' ORDER BY x.id LOOP
        total := total + identity_sync._notify_safely(n, ARRAY(
            SELECT identity_sync._notice_request(r)
              FROM identity_sync.request r JOIN identity_sync.product p ON p.id = r.product_id
             WHERE r.state = 'approved'
               AND r.expires_at <= identity_sync._now() + coalesce((n.options->>'lead_time')::interval, interval '7 days')
               AND (n.target_id IS NULL OR p.target_id = n.target_id)
               AND NOT EXISTS (SELECT FROM identity_sync.notice x
                                WHERE x.about @> ARRAY['request ' || r.id] AND x.notification_id = n.id)
             ORDER BY r.id));
    END LOOP;
    RETURN total;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._claim_notices(max_rows int)
RETURNS TABLE (id bigint, notification text, channel text, options jsonb, recipient text, subject text, body text,
               items int, attempt int)
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH c AS (
        UPDATE identity_sync.notice x
           SET state = 'sending', attempts = x.attempts + 1, sent_at = now(), due_at = now() + interval '5 minutes'
         WHERE x.id IN (SELECT y.id FROM identity_sync.notice y
                         WHERE y.state IN ('pending', 'retry', 'sending') AND y.due_at <= now()
                         ORDER BY y.due_at LIMIT max_rows FOR UPDATE SKIP LOCKED)
        RETURNING x.*)
    SELECT c.id, n.name, n.channel, n.options, c.recipient,
           CASE WHEN c.items > 1 THEN format('%s (+%s more)', c.subject, c.items - 1) ELSE c.subject END,
           c.body, c.items, c.attempts
      FROM c JOIN identity_sync.notification n ON n.id = c.notification_id
     ORDER BY c.id
$$;

CREATE OR REPLACE FUNCTION identity_sync._record_notices(ids bigint[], errors text[], transient boolean[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE identity_sync.notice x
       SET state = CASE WHEN o.error IS NULL THEN 'sent'
                        WHEN o.transient AND x.attempts < identity_sync._max_attempts() THEN 'retry'
                        ELSE 'failed' END,
           due_at = CASE WHEN o.error IS NOT NULL AND o.transient THEN now() + identity_sync._retry_delay(x.attempts)
                         ELSE x.due_at END,
           last_error = left(o.error, 300),
           sent_at = CASE WHEN o.error IS NULL THEN now() ELSE x.sent_at END
      FROM unnest(ids, errors, transient) AS o(id, error, transient)
     WHERE x.id = o.id AND x.state = 'sending';
END
$$;

CREATE OR REPLACE VIEW identity_sync.notifications AS
    SELECT n.name, n.on_event, t.name AS target, n.channel, n.recipients, n.subject, n.body, n.options, n.created_at
      FROM identity_sync.notification n LEFT JOIN identity_sync.target t ON t.id = n.target_id;

CREATE OR REPLACE VIEW identity_sync.notices AS
    SELECT x.id, n.name AS notification, n.on_event, n.channel, t.name AS target, x.persons, x.about,
           x.recipient, x.subject, x.body, x.items, x.state, x.attempts, x.due_at, x.last_error, x.created_at, x.sent_at
      FROM identity_sync.notice x
      JOIN identity_sync.notification n ON n.id = x.notification_id
      LEFT JOIN identity_sync.target t ON t.id = x.target_id;

-- sql/60_selfservice/10_login.sql

CREATE OR REPLACE FUNCTION identity_sync._person_of_role(role text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expr text := (SELECT login_expression FROM identity_sync._settings);
    p identity_sync.source := identity_sync._person_source();
    login text;
    keys text[];
BEGIN
    IF expr IS NULL OR p.id IS NULL OR role IS NULL THEN
        RETURN NULL;
    END IF;
    login := p.relation::text || ': ' || expr;
    keys := identity_sync._remembered_person(role, login);
    IF keys IS NOT NULL THEN
        RETURN keys[1];
    END IF;
    -- As identity_sync.run_as, read-only, bounded (src/evaluate.rs).
    PERFORM identity_sync._use_user_search_path();
    keys := identity_sync._evaluate(
        format('SELECT array_agg(k) FROM (SELECT person.%I::text AS k FROM %s AS person WHERE (%s)::text = $4[1] LIMIT 2) AS q',
               p.key_column, p.relation, expr),
        NULL::text[], ARRAY['login expression'], a4 => ARRAY[role]);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF cardinality(keys) > 1 THEN
        RAISE EXCEPTION 'role "%" is the login of more than one person', role
            USING ERRCODE = 'cardinality_violation',
                  DETAIL = format('Persons %s have it.', array_to_string(keys, ', ')),
                  HINT = 'The login expression (identity_sync.set_login) must give every person a role of their own.';
    END IF;
    PERFORM identity_sync._remember_person(role, login, keys[1]);
    RETURN keys[1];
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.set_login(expression text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source;
    typ regtype;
    dup jsonb;
    counts bigint[];
    persons bigint;
    with_role bigint;
BEGIN
    IF nullif(btrim(expression), '') IS NULL THEN
        PERFORM identity_sync._set_setting('set_login', 'login_expression', NULL::text);
        RETURN;
    END IF;
    p := identity_sync._require_person_source();
    PERFORM identity_sync._check_single_expression('login expression', expression);
    PERFORM identity_sync._use_user_search_path();
    typ := identity_sync._check_expression(
        'SELECT (' || expression || E'\n) AS v FROM ' || p.relation::text || ' AS person LIMIT 0', 8, expression,
        'login expression');
    PERFORM identity_sync._check_one_value('login expression', 'SELECT 1 FROM ' || p.relation::text || ' AS person WHERE', expression);
    IF typ NOT IN ('text'::regtype, 'character varying'::regtype, 'name'::regtype, 'character'::regtype) THEN
        RAISE EXCEPTION 'the login expression must give a role name (text), not %', typ
            USING ERRCODE = 'datatype_mismatch', DETAIL = expression,
                  HINT = 'Cast it, e.g. ''emp_'' || person.emp_no::text.';
    END IF;
    -- A role must be the login of one person at most.
    -- (Over every person, as identity_sync.run_as, read-only, bounded: src/evaluate.rs.)
    dup := identity_sync._evaluate(
        format('SELECT to_jsonb(d) FROM (SELECT v, count(*) AS n, array_to_string((array_agg(k ORDER BY k))[1:5], '', '') AS keys FROM ('
               'SELECT (%s)::text AS v, person.%I::text AS k FROM %s AS person) AS q '
               'WHERE v IS NOT NULL GROUP BY v HAVING count(*) > 1 ORDER BY v LIMIT 1) AS d',
               expression, p.key_column, p.relation),
        NULL::jsonb, ARRAY['login expression']);
    IF dup IS NOT NULL THEN
        RAISE EXCEPTION 'the login expression gives role "%" to % persons', dup->>'v', dup->>'n'
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('Persons %s%s.', dup->>'keys', CASE WHEN (dup->>'n')::bigint > 5 THEN format(' and %s more', (dup->>'n')::bigint - 5) ELSE '' END),
                  HINT = 'Every person needs a role of their own; include the person key in the expression.';
    END IF;
    counts := identity_sync._evaluate(
        format('SELECT ARRAY[count(*), count(r.oid)] FROM (SELECT (%s)::text AS v FROM %s AS person) AS q '
               'LEFT JOIN pg_catalog.pg_roles r ON r.rolname = q.v', expression, p.relation),
        NULL::bigint[], ARRAY['login expression']);
    persons := counts[1];
    with_role := counts[2];
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    PERFORM identity_sync._set_setting('set_login', 'login_expression', expression);
    IF persons > 10000 THEN
        RAISE NOTICE '% of % persons have a role of that name', with_role, persons
            USING HINT = format('Each self-service call looks the caller up with this expression; index it, e.g. CREATE INDEX ON %s ((%s));',
                                p.relation, regexp_replace(expression, '\mperson\.', '', 'g'));
    ELSE
        RAISE NOTICE '% of % persons have a role of that name', with_role, persons;
    END IF;
END
$$;

-- sql/60_selfservice/20_products.sql

CREATE OR REPLACE FUNCTION identity_sync._owners_from(with_owner_contract boolean)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('FROM %1$s AS owner CROSS JOIN LATERAL (SELECT $2::date AS today) AS _p JOIN %1$s AS requester ON ',
                  (identity_sync._require_person_source()).relation) || identity_sync._person_key_in('requester', 1) || ' '
        || CASE WHEN (identity_sync._contract_source()).id IS NULL
                THEN 'CROSS JOIN LATERAL (SELECT NULL::record AS requester_contract, NULL::record AS owner_contract) AS _c '
                ELSE identity_sync._primary_contract_join('requester', 'requester_contract')
                     || CASE WHEN with_owner_contract THEN identity_sync._primary_contract_join('owner', 'owner_contract') ELSE '' END
           END
$$;

CREATE OR REPLACE FUNCTION identity_sync._check_owners(owners text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    typ regtype;
BEGIN
    PERFORM identity_sync._check_user_text('owners condition', owners,
        'For example: EXISTS (SELECT FROM dept_manager m WHERE m.emp_no = owner.emp_no AND m.dept_no = requester_contract.dept_no AND today BETWEEN m.from_date AND m.to_date)');
    typ := identity_sync._probe_user_expression('owners condition', owners, identity_sync._owners_from(true), ' WHERE');
    IF typ <> 'boolean'::regtype THEN
        RAISE EXCEPTION 'owners condition must be boolean, not %', typ USING ERRCODE = 'datatype_mismatch',
            DETAIL = owners;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync._owner_pairs(p identity_sync.product, requesters text[], candidates text[] DEFAULT NULL)
RETURNS TABLE (requester text, owner text) LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ps identity_sync.source := identity_sync._person_source();
    c identity_sync.source := identity_sync._contract_source();
    sql text;
    pairs text[];
BEGIN
    sql := format('SELECT DISTINCT requester.%1$I::text AS r, owner.%1$I::text AS o %2$s WHERE owner.%1$I::text <> requester.%1$I::text ',
                  ps.key_column, identity_sync._owners_from(p.owners ~* '\mowner_contract\M'));
    IF candidates IS NOT NULL THEN
        sql := sql || 'AND ' || identity_sync._person_key_in('owner', 4) || ' ';
    END IF;
    IF c.id IS NOT NULL THEN
        sql := sql || format('AND EXISTS (SELECT FROM %1$s AS c WHERE c.%2$I = owner.%3$I AND c.%4$I::date <= today '
                             'AND (c.%5$I IS NULL OR c.%5$I::date >= today)) ',
                             c.relation, c.key_column, ps.key_column, c.starts_column, c.ends_column);
    END IF;
    sql := sql || 'AND (' || p.owners || E'\n)';
    -- As identity_sync.run_as, read-only, bounded (src/evaluate.rs); the pairs come back as a
    -- two-dimensional array.
    PERFORM identity_sync._use_user_search_path();
    pairs := identity_sync._evaluate(
        format('SELECT coalesce(array_agg(ARRAY[x.r, x.o]), ''{}'') FROM (%s) AS x', sql),
        NULL::text[], ARRAY[format('owners condition of product "%s"', p.name)],
        requesters, identity_sync._today(), a4 => candidates);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    RETURN QUERY SELECT pairs[i][1], pairs[i][2] FROM generate_subscripts(pairs, 1) AS i;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.add_product(name text, target text, groups text[], owners text,
                                          approval text DEFAULT 'any', valid_for interval DEFAULT NULL,
                                          description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    g text[] := identity_sync._check_product(groups, approval, valid_for);
    p identity_sync.product;
BEGIN
    PERFORM identity_sync._check_name('product', name, EXISTS (SELECT FROM identity_sync.product WHERE product.name = add_product.name),
                                      'Change it with identity_sync.alter_product(), or drop it first with identity_sync.drop_product().');
    PERFORM identity_sync._check_owners(owners);
    INSERT INTO identity_sync.product (name, target_id, groups, owners, approval, valid_for, description)
    VALUES (name, t.id, g, owners, approval, valid_for, description)
    RETURNING * INTO p;
    PERFORM identity_sync._audit('add_product', name, NULL, to_jsonb(p) || jsonb_build_object('target', t.name));
    IF (SELECT login_expression FROM identity_sync._settings) IS NULL THEN
        RAISE NOTICE 'nobody can request product "%" yet: no login expression is set', name
            USING HINT = 'Map persons to their roles with identity_sync.set_login(), e.g. ''emp_'' || person.emp_no::text.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.alter_product(name text, groups text[] DEFAULT NULL, owners text DEFAULT NULL,
                                            approval text DEFAULT NULL, valid_for interval DEFAULT NULL,
                                            description text DEFAULT NULL, new_name text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old identity_sync.product := identity_sync._product(name);
    n identity_sync.product;
BEGIN
    IF owners IS NOT NULL THEN
        PERFORM identity_sync._check_owners(owners);
    END IF;
    IF new_name IS NOT NULL THEN
        PERFORM identity_sync._check_name('product', new_name, EXISTS (SELECT FROM identity_sync.product WHERE product.name = new_name AND product.id <> old.id),
                                          'Choose another name, or drop that product first.');
    END IF;
    UPDATE identity_sync.product
       SET groups = identity_sync._check_product(coalesce(alter_product.groups, product.groups),
                                                 coalesce(alter_product.approval, product.approval),
                                                 CASE WHEN alter_product.valid_for = interval '0' THEN NULL
                                                      ELSE coalesce(alter_product.valid_for, product.valid_for) END),
           owners = coalesce(alter_product.owners, product.owners),
           approval = coalesce(alter_product.approval, product.approval),
           valid_for = CASE WHEN alter_product.valid_for = interval '0' THEN NULL
                            ELSE coalesce(alter_product.valid_for, product.valid_for) END,
           description = coalesce(alter_product.description, product.description),
           name = coalesce(new_name, product.name),
           updated_at = now()
     WHERE id = old.id RETURNING * INTO n;
    IF n.groups IS DISTINCT FROM old.groups THEN
        PERFORM identity_sync._replan(ARRAY(SELECT DISTINCT r.person_key FROM identity_sync.request r
                                              WHERE r.product_id = n.id AND r.state = 'approved'), 'alter_product');
    END IF;
    PERFORM identity_sync._audit('alter_product', n.name, to_jsonb(old), to_jsonb(n));
END
$$;

-- sql/60_selfservice/30_requests.sql

CREATE OR REPLACE FUNCTION identity_sync.request_access(product text, reason text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    p identity_sync.product := identity_sync._product(product);
    t identity_sync.target;
    existing identity_sync.request;
    r identity_sync.request;
BEGIN
    PERFORM identity_sync._expire_grants();   -- an expired grant must not block a new request
    SELECT * INTO existing FROM identity_sync.request x
     WHERE x.product_id = p.id AND x.person_key = me AND x.state IN ('pending', 'approved');
    IF existing.id IS NOT NULL THEN
        RAISE EXCEPTION 'you already have request % for product "%"', existing.id, p.name
            USING ERRCODE = 'duplicate_object', DETAIL = format('It is %s.', existing.state),
                  HINT = 'See identity_sync.my_requests; withdraw a pending request with identity_sync.revoke().';
    END IF;
    IF cardinality(identity_sync._owners(p, me)) = 0 THEN
        RAISE EXCEPTION 'nobody can approve product "%" for you', p.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'No active person other than you is an owner of the product for you today.',
                  HINT = 'The owners follow HR data (for example the manager of your department); ask an administrator.';
    END IF;
    BEGIN
        INSERT INTO identity_sync.request (product_id, person_key, requested_by, reason, requested_at)
        VALUES (p.id, me, identity_sync._caller(), reason, identity_sync._now())
        RETURNING * INTO r;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'you already have an open request for product "%"', p.name
            USING ERRCODE = 'duplicate_object', HINT = 'See identity_sync.my_requests.';
    END;
    PERFORM identity_sync._audit_request('request_access', r, jsonb_build_object('reason', reason));
    PERFORM identity_sync._notify_request('request_pending', r);
    SELECT * INTO t FROM identity_sync.target WHERE id = p.target_id;
    IF NOT EXISTS (SELECT FROM identity_sync.account a WHERE a.target_id = t.id AND a.person_key = me
                      AND a.planned_state IN ('active', 'disabled')) THEN
        RAISE NOTICE 'you have no account in "%" yet', t.name
            USING DETAIL = 'Once approved, the groups are granted when you have one.';
    END IF;
    RETURN r.id;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.approve(request_id bigint, comment text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    r identity_sync.request := identity_sync._decide(request_id, me, 'approve', comment);
    p identity_sync.product;
    waiting text[];
BEGIN
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    IF p.approval = 'all' THEN
        -- Every current owner must have approved; owners who are no longer owners do not count.
        waiting := ARRAY(SELECT o FROM unnest(identity_sync._owners(p, r.person_key)) AS o
                          WHERE NOT EXISTS (SELECT FROM identity_sync.decision d
                                             WHERE d.request_id = r.id AND d.person_key = o AND d.decision = 'approve')
                          ORDER BY o);
    END IF;
    UPDATE identity_sync.request x
       SET approvals = x.approvals + 1,
           state = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN 'approved' ELSE 'pending' END,
           decided_at = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN identity_sync._now() END,
           expires_at = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN identity_sync._now() + p.valid_for END
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request('approve', r, jsonb_build_object('approver', me, 'comment', comment)
                                                       || CASE WHEN r.expires_at IS NOT NULL THEN jsonb_build_object('expires_at', r.expires_at) ELSE '{}' END
                                                       || CASE WHEN cardinality(waiting) > 0 THEN jsonb_build_object('waiting_for', waiting) ELSE '{}' END);
    IF r.state = 'approved' THEN
        PERFORM identity_sync._notify_request('request_decided', r,
                                              jsonb_build_object('decision', 'approve', 'decided_by', me, 'comment', comment));
        PERFORM identity_sync._replan(ARRAY[r.person_key], 'approve');
    ELSE
        RAISE NOTICE 'request % waits for % more owner(s)', r.id, cardinality(waiting)
            USING DETAIL = 'Product "' || p.name || '" needs the approval of every current owner.';
    END IF;
    RETURN r.state;
END
$$;

CREATE OR REPLACE FUNCTION identity_sync.deny(request_id bigint, comment text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    r identity_sync.request := identity_sync._decide(request_id, me, 'deny', comment);
BEGIN
    UPDATE identity_sync.request x SET state = 'denied', decided_at = identity_sync._now()
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request('deny', r, jsonb_build_object('approver', me, 'comment', comment));
    PERFORM identity_sync._notify_request('request_decided', r,
                                          jsonb_build_object('decision', 'deny', 'decided_by', me, 'comment', comment));
    RETURN r.state;
END
$$;

-- <<< END generated by scripts/upgrade-refresh

-- ---------------------------------------------------------------------------------------------
-- Event triggers
-- ---------------------------------------------------------------------------------------------

CREATE EVENT TRIGGER identity_sync_exclude_worker ON ddl_command_start
    WHEN TAG IN ('ALTER EXTENSION')
    EXECUTE FUNCTION identity_sync._exclude_worker_on_ddl();

-- Off since the top of this script; from here on they run 0.2.0's functions.
ALTER EVENT TRIGGER identity_sync_follow_source_ddl ENABLE;
ALTER EVENT TRIGGER identity_sync_refuse_source_drop ENABLE;

-- ---------------------------------------------------------------------------------------------
-- Privileges as a fresh installation has them: nothing new for PUBLIC (99_private_by_default.sql)
-- but what is granted here
-- ---------------------------------------------------------------------------------------------

SELECT identity_sync._revoke_public_execute();
GRANT EXECUTE ON FUNCTION identity_sync._at(integer) TO identity_sync_evaluator;
GRANT EXECUTE ON FUNCTION identity_sync.name_variants(text,text) TO identity_sync_reader;
GRANT EXECUTE ON FUNCTION identity_sync.name_variants(text,text) TO identity_sync_evaluator;
GRANT EXECUTE ON FUNCTION identity_sync.normalize_diacritics(text) TO identity_sync_evaluator;
GRANT EXECUTE ON FUNCTION identity_sync.slug(text) TO identity_sync_evaluator;
GRANT EXECUTE ON FUNCTION identity_sync.worker_status() TO pg_monitor;
GRANT EXECUTE ON FUNCTION identity_sync.person_ref(anyelement) TO identity_sync_evaluator;
GRANT EXECUTE ON FUNCTION identity_sync.release(text,text) TO identity_sync_operator;
GRANT EXECUTE ON FUNCTION identity_sync.sync_person(text,text) TO identity_sync_operator;
GRANT EXECUTE ON FUNCTION identity_sync.add_person_source(regclass,text,text,integer) TO identity_sync_admin;
GRANT EXECUTE ON FUNCTION identity_sync.add_contract_source(regclass,text,text,text,text) TO identity_sync_admin;
GRANT EXECUTE ON FUNCTION identity_sync.set_person_match(text) TO identity_sync_admin;
GRANT EXECUTE ON FUNCTION identity_sync.resolve_merge_conflict(text) TO identity_sync_operator;
GRANT SELECT ON identity_sync.merge_conflicts TO identity_sync_reader;
GRANT SELECT ON identity_sync.pending_changes TO identity_sync_reader;
GRANT SELECT ON identity_sync.status TO identity_sync_reader;
GRANT SELECT ON identity_sync.status TO pg_monitor;
GRANT SELECT ON identity_sync.attempts TO identity_sync_reader;
GRANT SELECT ON identity_sync.metrics TO identity_sync_reader;
GRANT SELECT ON identity_sync.metrics TO pg_monitor;
GRANT EXECUTE ON FUNCTION identity_sync.add_notification(text,text,text,text,text,text,jsonb) TO identity_sync_admin;
GRANT EXECUTE ON FUNCTION identity_sync.drop_notification(text) TO identity_sync_admin;
GRANT SELECT ON identity_sync.notifications TO identity_sync_reader;
GRANT SELECT ON identity_sync.notices TO identity_sync_reader;

-- ---------------------------------------------------------------------------------------------
-- Comments
-- ---------------------------------------------------------------------------------------------

COMMENT ON FUNCTION identity_sync.add_notification(text, text, text, text, text, text, jsonb) IS 'Add a notification rule: on an event (create, update, enable, disable, delete, request_pending, request_decided, grant_expiring, target_held, target_quarantined, plan_errors), tell the recipients (SQL giving text or text[]) by mail or webhook; subject and body are SQL text expressions, checked now with the position of any error.';
COMMENT ON FUNCTION identity_sync.drop_notification(text) IS 'Drop a notification rule and its unsent notices.';
COMMENT ON VIEW identity_sync.notifications IS 'Notification rules: event, target (NULL: all), channel, recipients, subject and body expressions, options.';
COMMENT ON VIEW identity_sync.notices IS 'Notices written by the rules: recipient, subject, body, state (pending, sending, sent, retry, failed, skipped), attempts, last error.';
COMMENT ON FUNCTION identity_sync.release(text,text) IS 'Let the events held by a threshold go out: all, or those of the persons with a held event of one kind (create, disable, delete, ...), the others staying held.';
COMMENT ON FUNCTION identity_sync.add_person_source(regclass,text,text,integer) IS 'Register a person source: one row per person, identified by key (primary key or unique column); several sources have names and priorities (the highest that has a person gives person).';
COMMENT ON FUNCTION identity_sync.add_contract_source(regclass,text,text,text,text) IS 'Register the contract source of a person source (by its name, default ''default''): time-ranged rows (starts, inclusive ends; NULL = open) of a person.';
COMMENT ON FUNCTION identity_sync.set_person_match(text) IS 'Several person sources: SQL over two records a and b of different sources that are the same person (e.g. a.national_id = b.national_id); NULL = none.';
COMMENT ON FUNCTION identity_sync.resolve_merge_conflict(text) IS 'Resolve a merge conflict: the merged person''s accounts are retired (disabled, then deleted per delete_after).';
COMMENT ON VIEW identity_sync.merge_conflicts IS 'Persons a match joined although both had accounts: person_key keeps its accounts, those of merged_key wait for resolve_merge_conflict.';
COMMENT ON FUNCTION identity_sync.person(text) IS 'The person document: person row, contracts, primary contract, active today; with several sources also persons (every source''s record).';
COMMENT ON FUNCTION identity_sync.sync_person(text,text) IS 'Provision one person now: plan it in one target (or every target) at once and return the events written; the worker sends them at commit.';
COMMENT ON FUNCTION identity_sync.trace(text) IS 'The story of one person in time order: each plan''s causes (HR change with source, operation, transaction and commit time; date boundary, snapshot, resync, reconcile, self-service), the plan, its events, every delivery attempt and each result.';
COMMENT ON VIEW identity_sync.pending_changes IS 'Persons changed in HR and not yet planned, one row each, with the source and time of the first change.';
COMMENT ON VIEW identity_sync.status IS 'One row per target: state (active, paused, held, failing), accounts and events by state, oldest pending age, last success and error, deliveries in the last hour, resync progress.';
COMMENT ON VIEW identity_sync.attempts IS 'Every delivery attempt of every event kept: outcome (done, in flight, retry, failed, conflict, interrupted), HTTP status, latency, error.';
COMMENT ON VIEW identity_sync.metrics IS 'Monitoring samples in Prometheus'' terms (name, labels, value): worker up, planning backlog, unfinished events by target and state, held/quarantined/paused targets, plan errors, oldest pending age, last delivery and delivery counters per target, commit-to-delivery latency quantiles over the last 5 minutes; for pg_monitor and prometheus-postgres-exporter (monitoring/postgres_exporter.yaml).';

-- ---------------------------------------------------------------------------------------------
-- Targets compiled again: 0.2.0 compiles mappings and rules with markers (_at) and evaluates
-- them as identity_sync.run_as (default identity_sync_evaluator), which must be able to read
-- the HR tables they use (README "Upgrading": grant that before the update)
-- ---------------------------------------------------------------------------------------------

DO $recompile$
BEGIN
    PERFORM identity_sync._recompile_all();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'cannot compile the targets'' mappings and rules as %: %', identity_sync._run_as(), SQLERRM
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Since 0.2.0 user SQL is evaluated as the role of identity_sync.run_as, not as the extension owner.',
              HINT = format('GRANT SELECT ON the HR tables to %s (README "Security"), then run ALTER EXTENSION identity_sync UPDATE again.', identity_sync._run_as());
END
$recompile$;
