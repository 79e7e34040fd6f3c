-- identity_sync: roles, settings, every table, and the helpers every stage uses.
--
-- The files of sql/ load in the order of their numbers (src/lib.rs lists them); each ends with
-- the GRANTs and COMMENT ONs of what it creates. Naming: public objects are documented with
-- COMMENT ON; objects whose name starts with "_" are private to the extension and may change
-- between versions.

DO $roles$
DECLARE
    r text;
BEGIN
    -- identity_sync_evaluator is the role user SQL runs as (the default of the setting
    -- identity_sync.run_as, src/evaluate.rs): it can log in nowhere and holds nothing but what
    -- the extension's files grant it (its helper functions) and the administrator grants it
    -- (SELECT on HR tables).
    FOREACH r IN ARRAY ARRAY['identity_sync_reader', 'identity_sync_operator', 'identity_sync_admin',
                             'identity_sync_evaluator'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$roles$;
GRANT identity_sync_reader TO identity_sync_operator;
GRANT identity_sync_operator TO identity_sync_admin;

-- Singleton of global settings that are data, not GUCs (they must survive restarts and be seen
-- by the worker in its own transactions).
CREATE TABLE identity_sync._settings (
    singleton              boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    primary_contract_order text,          -- NULL: active first, then latest end, then latest start
    login_expression       text,          -- self-service: SQL over person giving its role name
    clock                  timestamptz,   -- NULL: real time
    boundary_checked_on    date DEFAULT current_date, -- last day the date-boundary check covered
                                          -- (from installation on: a first check must not skip
                                          -- moments the clock was moved past before it ran)
    search_path            text NOT NULL DEFAULT 'public', -- for user expressions (set_search_path)
    person_match           text           -- several person sources: SQL over a and b saying two
                                          -- records of different sources are one person
                                          -- (set_person_match); NULL: never
);
INSERT INTO identity_sync._settings DEFAULT VALUES;

-- pg_restore copies the dumped settings row into the one CREATE EXTENSION made: an INSERT
-- into the singleton updates it instead of failing on the key.
CREATE FUNCTION identity_sync._settings_upsert() RETURNS trigger
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
CREATE TRIGGER settings_upsert BEFORE INSERT ON identity_sync._settings
    FOR EACH ROW EXECUTE FUNCTION identity_sync._settings_upsert();

-- Registered HR sources.
CREATE TABLE identity_sync.source (
    id                int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relation          regclass NOT NULL UNIQUE,
    role              text NOT NULL CHECK (role IN ('person', 'contract', 'related')),
    key_column        name,        -- person: the person key; contract: the person key it belongs to
    starts_column     name,        -- contract
    ends_column       name,        -- contract
    affected          text,        -- related: SQL over "changed" returning person keys
    capture           text NOT NULL CHECK (capture IN ('trigger', 'snapshot')),
    snapshot_interval interval,    -- snapshot capture: how often
    snapshot_at       timestamptz, -- snapshot capture: last run
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- (Columns added since 0.2.0's first cut come last, where the upgrade script puts them.)
    name              text,        -- person: the source's name; contract: its person source's; related: NULL
    priority          int          -- person: the higher wins as the record `person` (several sources)
);
-- One person source per name, and one contract source per person source.
CREATE UNIQUE INDEX source_name ON identity_sync.source (role, name) WHERE role IN ('person', 'contract');

-- Several person sources (10_config.sql, "Several sources"): which person each source record
-- is. Kept only while a person source other than the single one named 'default' is registered;
-- the default source's records link to their own key, the others' to '<source>:<key>' unless a
-- match (set_person_match) joined them to a person that existed before. A link never changes
-- by itself: a person key stays when a source appears or a source's row goes away.
CREATE TABLE identity_sync._person_link (
    source     text NOT NULL,       -- the person source's name
    source_key text NOT NULL,       -- the record's key in that source, as text
    person_key text NOT NULL,
    linked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, source_key)
);
CREATE INDEX ON identity_sync._person_link (person_key);

-- Two persons a match joined although both had accounts: the kept person and the merged one,
-- whose accounts wait (nothing is planned for it) until an operator resolves the case
-- (resolve_merge_conflict).
CREATE TABLE identity_sync._merge_conflict (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_key  text NOT NULL,      -- the person the records now belong to (it keeps its accounts)
    merged_key  text NOT NULL,      -- the person merged into it, whose accounts are left alone
    targets     text[] NOT NULL,    -- targets where both have an account
    detected_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    resolution  text CHECK (resolution IN ('retire', 'keep'))
);
CREATE UNIQUE INDEX merge_conflict_open ON identity_sync._merge_conflict (merged_key) WHERE resolved_at IS NULL;

-- Per-person hashes of snapshot-captured sources.
CREATE TABLE identity_sync._snapshot (
    source_id  int NOT NULL REFERENCES identity_sync.source ON DELETE CASCADE,
    person_key text NOT NULL,
    hash       bytea NOT NULL,
    PRIMARY KEY (source_id, person_key)
);

-- The change outbox. The capture triggers append one row per triggering statement holding the
-- array of affected person keys: no index lookup and no deduplication on the HR write path.
-- No index, and no index may be added: the capture trigger appends to it with
-- simple_heap_insert (src/capture.rs), so an insert per HR statement is all the write path pays.
-- The planner drains it continuously, so it stays small and is read whole.
CREATE TABLE identity_sync.change (
    id        bigint GENERATED ALWAYS AS IDENTITY,
    source_id int,                 -- NULL for changes made by identity_sync itself (resync, config)
    op        text NOT NULL,       -- insert, update, delete, truncate, snapshot, boundary, resync, ...
    keys      text[] NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),   -- when the writing transaction started
    xid       xid8 NOT NULL DEFAULT pg_current_xact_id()  -- the writing transaction
);
-- Arrays of keys do not compress much; compressing them would cost the HR statement time.
ALTER TABLE identity_sync.change ALTER COLUMN keys SET STORAGE EXTERNAL;

-- Captured changes once the planner has claimed them from the outbox: what a plan consumed
-- (plan_cause), kept as long as the plans that consumed them (event_retention). The keys stay
-- in plan_cause, per plan; the commit time is resolved when claimed (_commit_time).
CREATE TABLE identity_sync.change_log (
    id           bigint PRIMARY KEY,   -- the outbox row's id
    source_id    int,
    source       text,                 -- the source relation's name when claimed
    op           text NOT NULL,
    persons      int NOT NULL,         -- how many person keys the change named
    xid          xid8,                 -- the HR transaction
    started_at   timestamptz NOT NULL, -- when that transaction started
    committed_at timestamptz,          -- when it committed, NULL when unknown (see _commit_time)
    claimed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON identity_sync.change_log (claimed_at);

-- Persons claimed from the outbox, deduplicated, waiting to be planned.
-- target_id 0 means every target; resync(target) marks persons for one target only.
CREATE TABLE identity_sync._dirty (
    person_key text NOT NULL,
    target_id  int NOT NULL DEFAULT 0,
    source_id  int,
    op         text NOT NULL,
    first_at   timestamptz NOT NULL,
    held_by    bigint,          -- a reconcile run (repair or adoption) that plans this person itself
    change_ids bigint[] NOT NULL DEFAULT '{}',  -- the captured changes (change_log) behind it, up to 50
    PRIMARY KEY (person_key, target_id)
);
-- (the whole key after first_at: _plan resumes its scan after the last person it claimed)
CREATE INDEX ON identity_sync._dirty (first_at, person_key, target_id) WHERE held_by IS NULL;
CREATE INDEX ON identity_sync._dirty (held_by) WHERE held_by IS NOT NULL;

-- Persons whose planning for one target waits for that target's next plan attempt: planning it
-- failed for the whole target (30_plan/60_plan.sql), and other targets went on without them.
CREATE TABLE identity_sync._deferred (
    target_id  int NOT NULL,
    person_key text NOT NULL,
    source_id  int,
    op         text NOT NULL,
    first_at   timestamptz NOT NULL,
    change_ids bigint[] NOT NULL DEFAULT '{}',  -- as in _dirty: the captured changes behind it
    PRIMARY KEY (target_id, person_key)
);

-- Targets and their configuration.
CREATE TABLE identity_sync.target (
    id         int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name <> ''),
    kind       text NOT NULL CHECK (kind IN ('scim', 'webhook', 'table')),
    url        text,
    options    jsonb NOT NULL DEFAULT '{}',
    paused     boolean NOT NULL DEFAULT false,
    held       jsonb,              -- why the target is held by a threshold, NULL when not
    released_at timestamptz,       -- last release(): events planned before it were approved
    compiled   text,               -- the compiled desired-state query (30_plan/10_compile.sql)
    resync_total int,              -- persons in the running resync, NULL when none runs
    resync_started_at timestamptz,
    adopting   bigint,         -- the reconcile run whose scan the planner adopts accounts from
    -- The circuit breaker (40_deliver.sql, _breaker): target-level failures in a row, and the
    -- quarantine they led to (NULL when not quarantined), with its single-request probes.
    failure_streak    int NOT NULL DEFAULT 0,
    failing_since     timestamptz,
    quarantined_at    timestamptz,
    quarantine_reason text,
    probe_at          timestamptz,
    probe_interval    interval,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- (Columns added since 0.1.0 come last, where the upgrade script's ADD COLUMN puts them.)
    -- Planning that fails for the whole target (a mapping that times out, 30_plan/60_plan.sql):
    -- attempts in a row, since when, the last error (which expression and why), next attempt.
    plan_failures     int NOT NULL DEFAULT 0,
    plan_failed_at    timestamptz,
    plan_error        text,
    plan_retry_at     timestamptz
);

-- Secrets: readable by the extension owner only; never shown anywhere.
CREATE TABLE identity_sync._secret (
    target_id int PRIMARY KEY REFERENCES identity_sync.target ON DELETE CASCADE,
    secret    text NOT NULL,
    set_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity_sync.mapping (
    target_id      int NOT NULL REFERENCES identity_sync.target ON DELETE CASCADE,
    attribute      text NOT NULL,
    expression     text NOT NULL,
    on_create_only boolean NOT NULL DEFAULT false,
    is_unique      boolean NOT NULL DEFAULT false,
    position       int GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (target_id, attribute)
);

CREATE TABLE identity_sync.rule (
    target_id int NOT NULL REFERENCES identity_sync.target ON DELETE CASCADE,
    name      text NOT NULL,
    condition text NOT NULL,
    groups    text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (target_id, name)
);

-- The account registry: person x target.
-- High-volume tables (account, event, _unique, _plan_error) carry no foreign key to target: a
-- per-row RI check would cost more than the planner's own work; drop_target() cleans them up.
CREATE TABLE identity_sync.account (
    target_id          int NOT NULL,
    person_key         text NOT NULL,
    remote_id          text,           -- the target's own id, once created
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'active', 'disabled', 'deleted')),
    attributes         jsonb NOT NULL DEFAULT '{}',   -- last applied
    groups             text[] NOT NULL DEFAULT '{}',  -- last applied
    planned_state      text NOT NULL DEFAULT 'pending'
                       CHECK (planned_state IN ('pending', 'active', 'disabled', 'deleted')),
    planned_attributes jsonb NOT NULL DEFAULT '{}',   -- after every event planned so far
    planned_groups     text[] NOT NULL DEFAULT '{}',
    refs               text[] NOT NULL DEFAULT '{}',  -- person keys referenced (manager, ...)
    seq                bigint NOT NULL DEFAULT 0,     -- last event sequence number
    created_at         timestamptz NOT NULL DEFAULT now(),
    planned_at         timestamptz NOT NULL DEFAULT now(),
    applied_at         timestamptz,
    orphan             boolean NOT NULL DEFAULT false, -- an account of nobody, found by reconcile and retired per the target's option orphans
    PRIMARY KEY (target_id, person_key)
);
CREATE INDEX ON identity_sync.account USING gin (refs) WHERE refs <> '{}';
-- Whether a target's accounts refer to anybody at all (_apply_done asks before it asks the GIN
-- index, which knows no target).
CREATE INDEX account_refs_target ON identity_sync.account (target_id) WHERE refs <> '{}';
CREATE INDEX ON identity_sync.account (target_id) WHERE orphan;

-- Values of is_unique attributes in use per target.
CREATE TABLE identity_sync._unique (
    target_id  int NOT NULL,
    attribute  text NOT NULL,
    value      text NOT NULL,
    person_key text,                 -- NULL: taken in the target by an account we do not manage
    PRIMARY KEY (target_id, attribute, value)
);
CREATE INDEX ON identity_sync._unique (target_id, person_key);

-- Provisioning events.
CREATE TABLE identity_sync.event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_id   int NOT NULL,
    person_key  text NOT NULL,
    seq         bigint NOT NULL,
    kind        text NOT NULL
                CHECK (kind IN ('create', 'update', 'enable', 'disable', 'delete', 'grant', 'revoke')),
    payload     jsonb NOT NULL,
    state       text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sending', 'done', 'retry', 'failed', 'held')),
    attempts    int NOT NULL DEFAULT 0,
    due_at      timestamptz NOT NULL DEFAULT now(),
    last_error  text,
    http_status int,
    plan_id     bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    done_at     timestamptz,
    UNIQUE (target_id, person_key, seq)
);
-- Delivery looks for due events and for unfinished predecessors; both stay small.
-- (seq after due_at: among events due at the same moment the lowest sequence numbers come
-- first, and those are the ones at the head of their person's queue, the only ones claimable.)
CREATE INDEX event_due ON identity_sync.event (target_id, due_at, seq) WHERE state IN ('pending', 'retry');
CREATE INDEX event_open ON identity_sync.event (target_id, person_key, seq) WHERE state <> 'done';
CREATE INDEX event_done ON identity_sync.event (done_at) WHERE state = 'done';
-- A plan run (and its causes) is kept while an event of it is (retention, 45_housekeeping.sql).
CREATE INDEX event_plan ON identity_sync.event (plan_id);

-- Delivery attempts that did not deliver (a retry, a failure, a conflict, one cut short by a
-- crash): with the event's own columns (its last attempt) the history of every attempt
-- (view attempts). A successful attempt is the event's done row itself, so the path every
-- event takes writes nothing here.
CREATE TABLE identity_sync._attempt (
    event_id    bigint NOT NULL,
    attempt     int NOT NULL,          -- the event's attempt number (retry() starts again at 1)
    sent_at     timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome     text NOT NULL,         -- retry, failed, conflict, interrupted
    http_status int,
    error       text
);
CREATE INDEX ON identity_sync._attempt (event_id);
CREATE INDEX ON identity_sync._attempt (recorded_at);

-- Per target counters for monitoring (view metrics): events delivered and attempts that failed
-- since the target was added, and the last of each.
CREATE TABLE identity_sync._delivery_stats (
    target_id       int PRIMARY KEY REFERENCES identity_sync.target ON DELETE CASCADE,
    delivered       bigint NOT NULL DEFAULT 0,
    failed_attempts bigint NOT NULL DEFAULT 0,
    last_success    timestamptz,
    last_failure    timestamptz
);

-- Planner runs, for trace and thresholds.
CREATE TABLE identity_sync.plan_run (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    persons    int NOT NULL,
    events     int NOT NULL DEFAULT 0,
    keys       text[] NOT NULL,
    caused_at  timestamptz   -- the earliest cause: commit of the oldest HR change consumed, or
                             -- when a resync, reconcile or configuration change asked
);
CREATE INDEX ON identity_sync.plan_run (started_at);

-- Why a plan planned whom: per plan, per captured change consumed (change_id, with the persons
-- it named that this plan planned), or per cause without a change row (change_id NULL: op
-- resync, reconcile, lifecycle, conflict, ...). Deleted with the plan run.
CREATE TABLE identity_sync.plan_cause (
    plan_id   bigint NOT NULL REFERENCES identity_sync.plan_run ON DELETE CASCADE,
    target_id int,             -- NULL: every target
    change_id bigint,          -- identity_sync.change_log
    op        text NOT NULL,
    at        timestamptz NOT NULL,   -- when the persons were marked for planning
    keys      text[] NOT NULL
);
CREATE INDEX ON identity_sync.plan_cause (plan_id);
CREATE INDEX ON identity_sync.plan_cause USING gin (keys);   -- trace(person_key)
CREATE INDEX ON identity_sync.plan_cause (change_id) WHERE change_id IS NOT NULL;

-- Events of the kinds thresholds guard (create, disable, delete) planned per target: the window
-- a threshold looks at is the last hour since the last release.
CREATE TABLE identity_sync._plan_count (
    target_id int NOT NULL,
    kind      text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    n         int NOT NULL
);
CREATE INDEX ON identity_sync._plan_count (target_id, at);

-- Per-person planning errors (a mapping that fails for this person only).
CREATE TABLE identity_sync._plan_error (
    target_id  int NOT NULL,
    person_key text NOT NULL,
    message    text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_id, person_key)
);

-- Who changed what, when. Written by SECURITY DEFINER functions only.
CREATE TABLE identity_sync._audit (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL DEFAULT session_user,
    action   text NOT NULL,
    object   text,
    old      jsonb,
    new      jsonb
);

-- Self-service products, requests and decisions (60_selfservice/); the planner reads approved
-- requests too (_granted_groups, 30_plan/20_desired.sql).

CREATE TABLE identity_sync.product (
    id          int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (btrim(name) <> ''),
    target_id   int NOT NULL REFERENCES identity_sync.target ON DELETE CASCADE,
    groups      text[] NOT NULL CHECK (cardinality(groups) > 0),
    owners      text NOT NULL,          -- SQL condition over owner, requester, requester_contract, ...
    approval    text NOT NULL DEFAULT 'any' CHECK (approval IN ('any', 'all')),
    valid_for   interval CHECK (valid_for > interval '0'),   -- NULL: until revoked
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity_sync.request (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id   int NOT NULL REFERENCES identity_sync.product ON DELETE CASCADE,
    person_key   text NOT NULL,          -- the requester, who is also the person granted
    requested_by text NOT NULL,          -- the requester's role
    reason       text,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'approved', 'denied', 'withdrawn', 'revoked', 'expired')),
    approvals    int NOT NULL DEFAULT 0, -- approvals so far (approval 'all' needs every current owner)
    requested_at timestamptz NOT NULL,   -- times are identity_sync's "now" (set_clock)
    decided_at   timestamptz,
    expires_at   timestamptz,            -- approved with valid_for: when the grant ends
    ended_at     timestamptz,            -- revoked, withdrawn or expired
    ended_by     text                    -- role that revoked or withdrew; 'identity_sync' for expiry
);
-- One open request per person and product.
CREATE UNIQUE INDEX request_open ON identity_sync.request (product_id, person_key)
    WHERE state IN ('pending', 'approved');
CREATE INDEX request_person ON identity_sync.request (person_key);
CREATE INDEX request_pending ON identity_sync.request (id) WHERE state = 'pending';
CREATE INDEX request_expiry ON identity_sync.request (expires_at) WHERE state = 'approved';

CREATE TABLE identity_sync.decision (
    request_id bigint NOT NULL REFERENCES identity_sync.request ON DELETE CASCADE,
    person_key text NOT NULL,            -- the owner who decided
    decided_by text NOT NULL,            -- the owner's role
    requester  text NOT NULL,            -- the request's person (row-level security without a join)
    decision   text NOT NULL CHECK (decision IN ('approve', 'deny')),
    comment    text,
    at         timestamptz NOT NULL,
    PRIMARY KEY (request_id, person_key)
);
CREATE INDEX decision_person ON identity_sync.decision (person_key);
CREATE INDEX decision_requester ON identity_sync.decision (requester);

-- Notifications (55_notify.sql): rules, and the outbox of notices written in the transaction
-- that caused them (a plan, a request, a decision, a hold), sent by the worker.
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

------------------------------------------------------------------------------------------------
-- Helpers of every stage
------------------------------------------------------------------------------------------------

CREATE FUNCTION identity_sync._audit(action text, object text, old jsonb, new jsonb)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._audit (action, object, old, new) VALUES ($1, $2, $3, $4)
$$;

-- Mark persons for planning (`op` says why: their self-service grants changed, persons were
-- merged). Through the outbox, like any change, so the planner never misses one committed
-- while it runs.
CREATE FUNCTION identity_sync._replan(keys text[], op text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF cardinality(keys) > 0 THEN
        INSERT INTO identity_sync.change (source_id, op, keys) VALUES (NULL, op, keys);
        PERFORM identity_sync._wake_at_commit();
    END IF;
END
$$;

-- The row of a named object (a target, a product) by its name, or an error listing the names
-- there are. `r` is a NULL of the row type wanted (NULL::identity_sync.target), which picks the
-- table; `otherwise` is the hint when the table is empty.
CREATE FUNCTION identity_sync._by_name(r anyelement, name text, otherwise text) RETURNS anyelement
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := (SELECT t.typrelid FROM pg_type t WHERE t.oid = pg_typeof(r));
    what text := (SELECT c.relname FROM pg_class c WHERE c.oid = rel);
    names text;
BEGIN
    EXECUTE format('SELECT * FROM %s WHERE name = $1', rel) INTO r USING name;
    IF r.id IS NULL THEN
        EXECUTE format('SELECT string_agg(name, '', '' ORDER BY name) FROM %s', rel) INTO names;
        RAISE EXCEPTION '% "%" does not exist', what, name USING ERRCODE = 'undefined_object',
            HINT = coalesce(initcap(what) || 's: ' || names || '.', otherwise);
    END IF;
    RETURN r;
END
$$;

-- "Now" for planning: the stored clock if set (tests, replays, what-if), else real time.
CREATE FUNCTION identity_sync._now() RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT clock FROM identity_sync._settings), now())
$$;

CREATE FUNCTION identity_sync._today() RETURNS date
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._now()::date
$$;

-- User SQL (mappings, rules, affected queries, owners, the login expression) is evaluated with
-- the search_path set by set_search_path(), the same in configuration checks, in the worker and
-- in the capture triggers of related sources: this one. pg_temp goes last: unlisted, it would be
-- searched first, and a caller of a SECURITY DEFINER function could shadow an HR table named in
-- the user SQL with a temporary table or view.
CREATE FUNCTION identity_sync._user_search_path() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN btrim(s.search_path) = '' THEN 'pg_temp' ELSE s.search_path || ', pg_temp' END
      FROM identity_sync._settings s
$$;

-- Our own functions run with search_path = pg_catalog, pg_temp and switch to the user's (until
-- they return) just before executing user SQL; everything of ours they touch afterwards is
-- schema-qualified.
CREATE FUNCTION identity_sync._use_user_search_path() RETURNS void
LANGUAGE sql AS $$
    SELECT pg_catalog.set_config('search_path', identity_sync._user_search_path(), true)
$$;

-- A scratch table of this session, pg_temp.<name> (`columns`: its column list), empty when this
-- returns: created at the first use, emptied at each later one. Not ON COMMIT DELETE ROWS:
-- PostgreSQL truncates every such table of a session at the commit of each transaction that
-- touched any temporary table, indexes rebuilt and files truncated, so that each transaction of
-- the worker's planning and delivery truncated all of them (perf at 100 HR changes/s: a quarter
-- of the worker's CPU). Emptied by DELETE while small, and by TRUNCATE once its file holds more
-- than 8 pages: the space of deleted rows is reused only after a VACUUM, which autovacuum never
-- gives temporary tables, and the planner counts dead rows in its estimate of a table never
-- analyzed (a few thousand of them turned _apply_done's probe of the registry by key into a
-- scan of it: README, "Table targets delivered one event at a time"); an emptied table was 0
-- pages, which the planner takes for 10. Every reader fills the table first in the same
-- transaction.
CREATE FUNCTION identity_sync._scratch(name text, columns text) RETURNS void
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

-- PostgreSQL lets PUBLIC execute every new function; ours are private unless a GRANT says
-- otherwise. Each file calls this just before its own GRANTs (for the functions created so far),
-- and the last step of the script (99_private_by_default.sql) calls it once more, for the
-- functions pgrx generates from Rust wherever it places them. A function whose privileges were
-- set already (a GRANT ... TO PUBLIC of an earlier file) is left as it is.
CREATE FUNCTION identity_sync._revoke_public_execute() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p
              WHERE p.pronamespace = 'identity_sync'::regnamespace AND p.proacl IS NULL LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f);
    END LOOP;
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

-- Every role of the extension uses the schema; PUBLIC too, for the self-service entry points.
GRANT USAGE ON SCHEMA identity_sync TO identity_sync_reader, identity_sync_operator, identity_sync_admin;
GRANT USAGE ON SCHEMA identity_sync TO PUBLIC;

-- Readers: registry, events, configuration (never secrets).
GRANT SELECT ON identity_sync.source, identity_sync.mapping, identity_sync.rule,
                identity_sync.plan_run, identity_sync.change, identity_sync.account, identity_sync.event,
                identity_sync.change_log, identity_sync.plan_cause
   TO identity_sync_reader;
GRANT SELECT (id, name, kind, url, options, paused, held, released_at, resync_total, resync_started_at, created_at, updated_at)
   ON identity_sync.target TO identity_sync_reader;
GRANT SELECT ON identity_sync.product TO identity_sync_reader;
GRANT SELECT ON identity_sync.notification, identity_sync.notice TO identity_sync_reader;

-- Self-service (any login mapped to a person): PUBLIC reads the product catalog and its own rows
-- of request and decision (row-level security, 60_selfservice/40_views.sql).
GRANT SELECT ON identity_sync.request, identity_sync.decision TO PUBLIC;
GRANT SELECT (id, name, target_id, groups, approval, valid_for, description) ON identity_sync.product TO PUBLIC;
GRANT SELECT (id, name) ON identity_sync.target TO PUBLIC;

-- Configuration, registry and history survive pg_dump / pg_restore.
SELECT pg_catalog.pg_extension_config_dump('identity_sync._settings', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.source', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._snapshot', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.target', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._secret', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.mapping', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.rule', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.account', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._unique', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.change', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._dirty', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._deferred', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.event', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._audit', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.product', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.request', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.decision', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.change_log', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.plan_run', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.plan_cause', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._attempt', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._delivery_stats', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.notification', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.notice', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._person_link', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._merge_conflict', '');
-- Their serial columns' sequences (table.column), one statement each: every call rewrites the
-- pg_extension row.
DO $dump$
DECLARE
    col text;
BEGIN
    FOREACH col IN ARRAY ARRAY['source.id', 'target.id', 'mapping.position', 'change.id', 'event.id', '_audit.id',
                               'plan_run.id', 'product.id', 'request.id', 'notification.id', 'notice.id',
                               '_merge_conflict.id'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(
            pg_get_serial_sequence('identity_sync.' || split_part(col, '.', 1), split_part(col, '.', 2))::regclass, '');
    END LOOP;
END
$dump$;

COMMENT ON SCHEMA identity_sync IS 'identity_sync: HR tables as the source of truth for identities';
COMMENT ON TABLE identity_sync.source IS 'Registered HR sources: person sources, contract sources, related sources.';
COMMENT ON COLUMN identity_sync.source.name IS 'Person source: its name (''default'' unless given); contract source: the name of the person source its contracts belong to.';
COMMENT ON COLUMN identity_sync.source.priority IS 'Person source: with several, the record of the highest priority that has the person is person.';
COMMENT ON TABLE identity_sync.change IS 'The change outbox: one row per captured statement, holding the affected person keys.';
COMMENT ON TABLE identity_sync.target IS 'Targets that get accounts: scim, webhook or table.';
COMMENT ON TABLE identity_sync.mapping IS 'Per target: attribute <- SQL expression over person, contract, contracts, today, iteration.';
COMMENT ON TABLE identity_sync.rule IS 'Per target: business rules (SQL conditions) and the groups they grant; a person is in scope when one matches.';
COMMENT ON TABLE identity_sync.account IS 'The account registry: person x target, applied and planned state.';
COMMENT ON TABLE identity_sync.event IS 'Provisioning events, delivered strictly in seq order per person and target.';
COMMENT ON TABLE identity_sync.plan_run IS 'One row per planner transaction: which persons it planned and how many events it wrote; caused_at: its earliest cause.';
COMMENT ON TABLE identity_sync.plan_cause IS 'Why a plan planned whom: the captured changes it consumed (change_id) or another cause (op resync, reconcile, lifecycle, conflict), with the persons concerned.';
COMMENT ON TABLE identity_sync.change_log IS 'Captured changes the planner has claimed from the outbox: source, operation, HR transaction (xid) and when it started and committed; kept as long as the plans that consumed them.';
COMMENT ON COLUMN identity_sync.change_log.committed_at IS 'Commit time of the HR transaction: recorded by the capturing backend at commit, or from track_commit_timestamp; NULL when neither knows it.';
COMMENT ON COLUMN identity_sync.change.xid IS 'The transaction that wrote the change (pg_current_xact_id()).';
COMMENT ON TABLE identity_sync.product IS 'Self-service products: groups in a target that persons can request, approved by owners computed from HR data.';
COMMENT ON COLUMN identity_sync.product.owners IS 'SQL condition over owner (candidate person row), requester, requester_contract, owner_contract and today; owners are active persons other than the requester.';
COMMENT ON COLUMN identity_sync.product.approval IS 'any: one current owner approves; all: every current owner approves.';
COMMENT ON COLUMN identity_sync.product.valid_for IS 'How long an approved grant lasts before the worker expires it; NULL = until revoked.';
COMMENT ON TABLE identity_sync.request IS 'Self-service requests (row-level security: a login reads its own, the ones it can decide and the ones it decided).';
COMMENT ON COLUMN identity_sync.request.state IS 'pending, approved, denied, withdrawn (by the requester while pending), revoked, expired.';
COMMENT ON TABLE identity_sync.notification IS 'Notification rules: on which event whom to tell (recipients, subject and body are SQL), by mail or webhook.';
COMMENT ON TABLE identity_sync.notice IS 'The notification outbox: one message per rule and recipient, written in the transaction that caused it, sent by the worker with retries.';
COMMENT ON COLUMN identity_sync.notice.state IS 'pending, sending, sent, retry, failed (given up or permanent), skipped (no recipient: last_error says why), held (about events a threshold holds: sent at release, dropped at discard).';
COMMENT ON TABLE identity_sync.decision IS 'Approvals and denials of requests by owners (row-level security: read by the owner and the requester).';
