-- reconcile() as psql shows it when the input is wrong: an unknown target, a webhook target
-- (nothing to read), an unknown mode, a target nobody is in scope of; and, for a target it
-- could reconcile, the database the worker does not serve. Each is an error with a HINT, and
-- nothing is recorded. (Runs that read targets: tests/reconcile.rs.)
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
RESET client_min_messages;
\set SHOW_CONTEXT never
\set VERBOSITY default

CREATE TABLE person (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE app_user (id int PRIMARY KEY, name text, active boolean NOT NULL DEFAULT true);
GRANT SELECT ON person TO identity_sync_evaluator;
SELECT identity_sync.add_person_source('person', 'id');
SET client_min_messages = warning;
SELECT identity_sync.add_target('app', 'table', NULL,
       '{"relation": "public.app_user", "key_column": "id", "active_column": "active"}');
SELECT identity_sync.map('app', 'name', 'person.name');
SELECT identity_sync.add_rule('app', 'everyone', 'true');
SELECT identity_sync.add_target('hook', 'webhook', 'http://127.0.0.1:9/hook');
SELECT identity_sync.map('hook', 'name', 'person.name');
SELECT identity_sync.add_rule('hook', 'everyone', 'true');
SELECT identity_sync.add_target('unscoped', 'table', NULL, '{"relation": "public.app_user", "key_column": "id"}');
RESET client_min_messages;

SELECT count(*) AS audit_rows FROM identity_sync.audit_log \gset

SELECT * FROM identity_sync.reconcile('nope');
SELECT * FROM identity_sync.reconcile('hook');
SELECT * FROM identity_sync.reconcile('app', 'fix');
SELECT * FROM identity_sync.reconcile('unscoped');
-- valid input, but the worker serves another database (regression is not the worker's)
SELECT * FROM identity_sync.reconcile('app', 'repair');

-- nothing recorded
SELECT count(*) AS runs FROM identity_sync.reconcile_run;
SELECT count(*) - :audit_rows AS new_audit_rows FROM identity_sync.audit_log;
SELECT count(*) AS findings FROM identity_sync.drift;
SELECT count(*) AS orphans FROM identity_sync.orphans;

-- the target options of reconciliation are checked like any other
SELECT identity_sync.alter_target('app', options => '{"orphans": "archive"}');
SELECT identity_sync.alter_target('app', options => '{"reconcile_every": "-1 day"}');
SELECT identity_sync.alter_target('app', options => '{"reconcile_mode": "fix"}');

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE person, app_user;
