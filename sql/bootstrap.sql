-- identity_sync: roles and the tables every stage shares.
--
-- Naming: public objects are documented with COMMENT ON (see finalize.sql); objects whose name
-- starts with "_" are private to the extension and may change between versions.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'identity_sync_reader') THEN
        CREATE ROLE identity_sync_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'identity_sync_operator') THEN
        CREATE ROLE identity_sync_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'identity_sync_admin') THEN
        CREATE ROLE identity_sync_admin NOLOGIN;
    END IF;
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
    search_path            text NOT NULL DEFAULT 'public'  -- for user expressions (set_search_path)
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
               clock = NEW.clock, boundary_checked_on = NEW.boundary_checked_on, search_path = NEW.search_path;
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
    created_at        timestamptz NOT NULL DEFAULT now()
);

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
    at        timestamptz NOT NULL DEFAULT now()
);
-- Arrays of keys do not compress much; compressing them would cost the HR statement time.
ALTER TABLE identity_sync.change ALTER COLUMN keys SET STORAGE EXTERNAL;

-- Persons claimed from the outbox, deduplicated, waiting to be planned.
-- target_id 0 means every target; resync(target) marks persons for one target only.
CREATE TABLE identity_sync._dirty (
    person_key text NOT NULL,
    target_id  int NOT NULL DEFAULT 0,
    source_id  int,
    op         text NOT NULL,
    first_at   timestamptz NOT NULL,
    PRIMARY KEY (person_key, target_id)
);
CREATE INDEX ON identity_sync._dirty (first_at);

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
    compiled   text,               -- the compiled desired-state query (see config.sql)
    resync_total int,              -- persons in the running resync, NULL when none runs
    resync_started_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
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
    PRIMARY KEY (target_id, person_key)
);
CREATE INDEX ON identity_sync.account USING gin (refs) WHERE refs <> '{}';

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

-- Planner runs, for trace and thresholds.
CREATE TABLE identity_sync.plan_run (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    persons    int NOT NULL,
    events     int NOT NULL DEFAULT 0,
    keys       text[] NOT NULL
);

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
