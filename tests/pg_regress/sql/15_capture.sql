-- Capture as a user meets it: what writes to HR tables leave in the outbox; what identity_sync
-- does with DDL on registered sources (follows renames, refuses drops and changes that would
-- break planning or capture); and every way a capture trigger can fail, as the HR writer sees it,
-- with its SQLSTATE.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
RESET client_min_messages;
-- CONTEXT lines name our functions' line numbers; DETAIL and HINT are the contract.
\set SHOW_CONTEXT never
\set VERBOSITY default

CREATE SCHEMA hr;
CREATE TABLE hr.person (id int PRIMARY KEY, given text NOT NULL, family text NOT NULL, nick text);
CREATE TABLE hr.contract (person_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date);
CREATE TABLE hr.dept (code text PRIMARY KEY, name text NOT NULL);
INSERT INTO hr.dept VALUES ('S', 'Sales'), ('E', 'Engineering');
INSERT INTO hr.person VALUES (1, 'Ann', 'Lee', NULL), (2, 'Bob', 'Ng', NULL);
INSERT INTO hr.contract VALUES (1, 'S', '2020-01-01', NULL), (2, 'E', '2021-01-01', NULL);
-- identity_sync reads sources and evaluates expressions as identity_sync_evaluator (README, Security)
GRANT USAGE ON SCHEMA hr TO identity_sync_evaluator;
GRANT SELECT ON ALL TABLES IN SCHEMA hr TO identity_sync_evaluator;
ALTER DEFAULT PRIVILEGES IN SCHEMA hr GRANT SELECT ON TABLES TO identity_sync_evaluator;
SELECT identity_sync.set_search_path('hr, public');
SELECT identity_sync.add_person_source('hr.person', 'id');
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'starts', 'ends');
SELECT identity_sync.add_related_source('hr.dept', 'SELECT c.person_id FROM hr.contract c JOIN changed d ON d.code = c.dept');
SELECT identity_sync.add_target('dir', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true}');
SELECT identity_sync.map('dir', 'name', $$person.given || ' ' || person.family$$);
SELECT identity_sync.add_rule('dir', 'sales', $$contract.dept = 'S'$$);
SELECT id, relation, role, key_column, starts_column, ends_column FROM identity_sync.source ORDER BY id;
CREATE VIEW outbox AS
SELECT s.relation, c.op, c.keys
  FROM identity_sync.change c LEFT JOIN identity_sync.source s ON s.id = c.source_id ORDER BY c.id;

------------------------------------------------------------------------------------------------
-- Capture: one outbox row per statement, holding the keys it touched (no worker serves the
-- regression database, so they stay there).
------------------------------------------------------------------------------------------------
INSERT INTO hr.person VALUES (3, 'Cy', 'Oh', NULL), (4, 'Di', 'Po', NULL);
UPDATE hr.person SET nick = 'annie' WHERE id = 1;
UPDATE hr.person SET id = 40 WHERE id = 4;     -- a key change: the old and the new person
DELETE FROM hr.person WHERE id = 40;
UPDATE hr.person SET nick = NULL WHERE id < 0; -- touches nothing: no row
UPDATE hr.dept SET name = 'Sales & Marketing' WHERE code = 'S';
SELECT * FROM outbox;
DELETE FROM identity_sync.change;

------------------------------------------------------------------------------------------------
-- DDL on sources: renames of registered columns and tables are followed
------------------------------------------------------------------------------------------------
ALTER TABLE hr.person RENAME COLUMN id TO person_no;
SELECT relation, key_column FROM identity_sync.source WHERE role = 'person';
SELECT tgname, pg_get_triggerdef(oid) AS definition
  FROM pg_trigger WHERE tgrelid = 'hr.person'::regclass AND NOT tgisinternal ORDER BY tgname;
UPDATE hr.person SET nick = 'bobby' WHERE person_no = 2;
SELECT * FROM outbox;
DELETE FROM identity_sync.change;
SELECT compiled LIKE '%person.person_no%' AS target_compiled_with_new_name FROM identity_sync.target;

ALTER TABLE hr.contract RENAME COLUMN starts TO begins;
SELECT relation, key_column, starts_column, ends_column FROM identity_sync.source WHERE role = 'contract';
SELECT in_scope, matched_rules, attributes FROM identity_sync.preview('1', 'dir');

ALTER TABLE hr.person RENAME TO people;
ALTER TABLE hr.people ALTER COLUMN nick TYPE varchar(20);   -- a change that breaks nothing
SELECT relation FROM identity_sync.source ORDER BY id;
SELECT compiled LIKE '%FROM hr.people AS person%' AS target_compiled_with_new_name FROM identity_sync.target;
UPDATE hr.people SET nick = 'ann' WHERE person_no = 1;
SELECT * FROM outbox;
DELETE FROM identity_sync.change;

-- who changed what: the follows are in the audit log
SELECT action, object, old->>'key_column' AS old_key, new->>'key_column' AS new_key,
       old->>'starts_column' AS old_starts, new->>'starts_column' AS new_starts
  FROM identity_sync.audit_log WHERE action = 'follow_rename' ORDER BY id;

------------------------------------------------------------------------------------------------
-- DDL on sources: what would break planning or capture is refused
------------------------------------------------------------------------------------------------
-- a registered column, a registered table, or a schema holding one cannot be dropped
ALTER TABLE hr.people DROP COLUMN person_no;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER TABLE hr.contract DROP COLUMN ends;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TABLE hr.dept;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP SCHEMA hr CASCADE;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- a column the mappings use cannot be renamed or dropped under them
ALTER TABLE hr.people RENAME COLUMN given TO first_name;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER TABLE hr.people DROP COLUMN family;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- nor one that a related source's affected query reads, on any table
ALTER TABLE hr.dept RENAME COLUMN code TO dept_code;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER TABLE hr.contract RENAME COLUMN person_id TO emp;   -- registered, but the query reads it
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER TABLE hr.contract RENAME COLUMN dept TO department; -- and so does a rule
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER SCHEMA hr RENAME TO staff;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- nor the self-service login expression
SELECT identity_sync.set_login($$'regress_login_' || person.nick$$);
ALTER TABLE hr.people RENAME COLUMN nick TO nickname;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT identity_sync.set_login(NULL);
-- contract dates stay dates
ALTER TABLE hr.contract ALTER COLUMN ends TYPE text;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- nothing of it happened
SELECT relation, key_column, starts_column, ends_column FROM identity_sync.source ORDER BY id;

-- what the hints say works: change the configuration in the same transaction
BEGIN;
SELECT identity_sync.unmap('dir', 'name');
ALTER TABLE hr.people RENAME COLUMN given TO first_name;
SELECT identity_sync.map('dir', 'name', $$person.first_name || ' ' || person.family$$);
COMMIT;
SELECT attributes FROM identity_sync.preview('1', 'dir');
BEGIN;
SELECT identity_sync.drop_source('hr.dept');
DROP TABLE hr.dept;
ROLLBACK;
-- an unregistered, unused column goes as usual
ALTER TABLE hr.people DROP COLUMN nick;

------------------------------------------------------------------------------------------------
-- Capture failures, as the HR writer sees them. The event triggers prevent the first two;
-- they are shown with the rename-following trigger disabled, as after a change it did not see.
------------------------------------------------------------------------------------------------
ALTER EVENT TRIGGER identity_sync_follow_source_ddl DISABLE;
-- the key column renamed behind identity_sync's back
BEGIN;
ALTER TABLE hr.people RENAME COLUMN person_no TO pno;
UPDATE hr.people SET family = 'Lee' WHERE pno = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
-- a related source's affected query broken behind its back
BEGIN;
ALTER TABLE hr.dept RENAME COLUMN code TO dept_code;
UPDATE hr.dept SET name = 'Sales' WHERE dept_code = 'S';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
ALTER EVENT TRIGGER identity_sync_follow_source_ddl ENABLE;

-- the outbox renamed, or given another shape
BEGIN;
ALTER TABLE identity_sync.change RENAME TO change_moved;
UPDATE hr.people SET family = 'Lee' WHERE person_no = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN;
ALTER TABLE identity_sync.change ADD COLUMN note text;
UPDATE hr.people SET family = 'Lee' WHERE person_no = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

-- capture triggers installed by hand
CREATE TABLE hr.extra (id int PRIMARY KEY, emp_no int);
CREATE TRIGGER by_hand AFTER INSERT ON hr.extra FOR EACH ROW EXECUTE FUNCTION identity_sync._capture('1', 'person', 'id');
INSERT INTO hr.extra VALUES (1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand BEFORE INSERT ON hr.extra FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('1', 'person', 'id');
INSERT INTO hr.extra VALUES (1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand AFTER INSERT ON hr.extra FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('1', 'person', 'id');
INSERT INTO hr.extra VALUES (1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand AFTER INSERT ON hr.extra REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('one', 'person');
INSERT INTO hr.extra VALUES (1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand AFTER TRUNCATE ON hr.extra FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('1', 'person', 'id');
TRUNCATE hr.extra;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand AFTER TRUNCATE ON hr.extra FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture_truncate();
TRUNCATE hr.extra;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
-- ... naming a source that does not exist, another table's source, or the wrong key column
CREATE TRIGGER by_hand AFTER INSERT ON hr.extra REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('99', 'person', 'emp');
INSERT INTO hr.extra VALUES (1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand AFTER INSERT ON hr.extra REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('1', 'person', 'person_no');
INSERT INTO hr.extra VALUES (1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.extra;
CREATE TRIGGER by_hand AFTER UPDATE ON hr.people REFERENCING OLD TABLE AS o NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture('1', 'person', 'id');
UPDATE hr.people SET family = 'Lee' WHERE person_no = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TRIGGER by_hand ON hr.people;
-- nothing of it reached the outbox
SELECT count(*) AS outbox_rows FROM identity_sync.change;

------------------------------------------------------------------------------------------------
-- The extension's own DDL still works: DROP EXTENSION takes the capture and event triggers
------------------------------------------------------------------------------------------------
SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
SELECT count(*) AS event_triggers FROM pg_event_trigger WHERE evtname LIKE 'identity_sync%';
SELECT count(*) AS capture_triggers FROM pg_trigger WHERE tgname LIKE 'identity_sync%';
ALTER TABLE hr.people RENAME COLUMN person_no TO id;
DROP SCHEMA hr CASCADE;
