-- identity_sync 0.1.0 → 0.2.0, run by ALTER EXTENSION identity_sync UPDATE (README "Upgrading").
--
-- One script per release, hand-kept as pgmq keeps its upgrade scripts: what holds data is
-- changed in place (new tables, columns added with their defaults, indexes, roles created only
-- if missing), and what is code (functions, views, event triggers) is created again from the
-- definitions 0.2.0 creates afresh. tests/upgrade.rs installs 0.1.0, fills it, runs this
-- script on the running cluster and compares the catalog with a fresh CREATE EXTENSION
-- (tests/upgrade/catalog.sql): the two must be identical, privileges and comments included.
-- This is the template of that script: build.rs (build/upgrade_script.rs) writes the script
-- itself to sql/, with each "-- @include" line replaced by that statement of sql/ and the
-- "-- @code" line by all functions, views, privileges and comments of sql/ (README "Upgrading").
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

-- @include CREATE TABLE identity_sync.change_log
-- @include CREATE INDEX ON identity_sync.change_log

-- Persons waiting to be planned keep no change ids from before the update.
ALTER TABLE identity_sync._dirty ADD COLUMN change_ids bigint[] NOT NULL DEFAULT '{}';
-- _plan resumes its scan after the last person it claimed: the whole key after first_at.
DROP INDEX identity_sync._dirty_first_at_idx;
-- @include CREATE INDEX ON identity_sync._dirty (first_at,

-- @include CREATE TABLE identity_sync._deferred

ALTER TABLE identity_sync.target
    ADD COLUMN plan_failures  int NOT NULL DEFAULT 0,
    ADD COLUMN plan_failed_at timestamptz,
    ADD COLUMN plan_error     text,
    ADD COLUMN plan_retry_at  timestamptz;

-- @include CREATE INDEX event_plan

-- Whether a target's accounts refer to anybody at all (00_schema.sql, _apply_done).
-- @include CREATE INDEX account_refs_target

-- @include CREATE TABLE identity_sync._attempt
-- @include CREATE INDEX ON identity_sync._attempt (event_id);
-- @include CREATE INDEX ON identity_sync._attempt (recorded_at);

-- The counters start at the update: deliveries before it are not counted.
-- @include CREATE TABLE identity_sync._delivery_stats

-- Plan runs from before the update have no cause recorded (caused_at NULL, no plan_cause rows).
ALTER TABLE identity_sync.plan_run ADD COLUMN caused_at timestamptz;
-- @include CREATE INDEX ON identity_sync.plan_run

-- @include CREATE TABLE identity_sync.plan_cause
-- @include CREATE INDEX ON identity_sync.plan_cause (plan_id);
-- @include CREATE INDEX ON identity_sync.plan_cause USING
-- @include CREATE INDEX ON identity_sync.plan_cause (change_id)

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
-- @include CREATE UNIQUE INDEX source_name
-- @include CREATE TABLE identity_sync._person_link
-- @include CREATE INDEX ON identity_sync._person_link
-- @include CREATE TABLE identity_sync._merge_conflict
-- @include CREATE UNIQUE INDEX merge_conflict_open

-- Notifications (00_schema.sql, 55_notify.sql): rules and their outbox, new in 0.2.0.
-- @include CREATE TABLE identity_sync.notification

-- @include CREATE TABLE identity_sync.notice
-- The worker claims due notices ('sending' ones whose lease ran out too: a crash's).
-- @include CREATE INDEX notice_due
-- One collecting digest per rule and recipient.
-- @include CREATE UNIQUE INDEX notice_digest
-- @include CREATE INDEX notice_persons
-- @include CREATE INDEX notice_about
-- @include CREATE INDEX notice_created
-- @include CREATE INDEX notice_target

-- pg_dump keeps the rows of the new tables (with -- @code: pg_extension_config_dump) and the
-- values of the serial sequences, the new ones among them.
-- @include DO $dump$

-- ---------------------------------------------------------------------------------------------
-- New types
-- ---------------------------------------------------------------------------------------------

-- @include CREATE TYPE identity_sync._key_hash
-- @include CREATE TYPE identity_sync._desired_row
-- @include CREATE TYPE identity_sync._notice_row

-- ---------------------------------------------------------------------------------------------
-- Functions written in Rust (src/, MODULE_PATHNAME) that are new or changed, by hand: what
-- pgrx generates for them (cargo pgrx schema), one line each
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION identity_sync._at(n integer) RETURNS boolean LANGUAGE c PARALLEL RESTRICTED STRICT AS 'MODULE_PATHNAME', 'identity_sync_at';

CREATE OR REPLACE FUNCTION identity_sync._check_expression(query text, "offset" integer, expression text, what text DEFAULT 'expression'::text) RETURNS oid LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'check_expression_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._check_query(query text, "offset" integer, user_query text, what text DEFAULT 'query'::text) RETURNS integer LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'check_query_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._commit_time(xid bigint) RETURNS timestamp with time zone LANGUAGE c PARALLEL SAFE STRICT AS 'MODULE_PATHNAME', 'commit_time_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._evaluate(query text, result anyelement, names text[] DEFAULT NULL::text[], a1 text[] DEFAULT NULL::text[], a2 date DEFAULT NULL::date, a3 integer DEFAULT NULL::integer, a4 text[] DEFAULT NULL::text[], timeout_ms integer DEFAULT NULL::integer, setting text DEFAULT NULL::text) RETURNS anyelement LANGUAGE c AS 'MODULE_PATHNAME', 'evaluate_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._exclude_worker() RETURNS void LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'exclude_worker_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._failed_at() RETURNS integer LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'failed_at_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._raise(sqlstate text, message text, detail text, hint text) RETURNS void LANGUAGE c PARALLEL SAFE AS 'MODULE_PATHNAME', 'raise_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._run_as() RETURNS text LANGUAGE c STABLE PARALLEL SAFE STRICT AS 'MODULE_PATHNAME', 'run_as_sql_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._statement_timeout() RETURNS interval LANGUAGE c STABLE PARALLEL SAFE STRICT AS 'MODULE_PATHNAME', 'statement_timeout_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._timed_out() RETURNS boolean LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'timed_out_wrapper';

CREATE OR REPLACE FUNCTION identity_sync._capture() RETURNS trigger LANGUAGE c SECURITY DEFINER SET search_path TO 'pg_catalog', 'pg_temp'
    AS 'MODULE_PATHNAME', '_capture_wrapper';

-- ---------------------------------------------------------------------------------------------
-- Every function and view of sql/ as CREATE OR REPLACE, in the order the fresh script creates
-- them (an unchanged one replaces itself and keeps its privileges), with the GRANTs, REVOKEs,
-- COMMENTs and configuration-dump registrations of sql/: privileges and comments as a fresh
-- installation has them, nothing new for PUBLIC (99_private_by_default.sql)
-- ---------------------------------------------------------------------------------------------

-- @code

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
