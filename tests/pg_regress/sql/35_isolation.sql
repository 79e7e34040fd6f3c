-- Isolation of user SQL (README, Security): mappings, rules, affected queries, owners and the
-- login expression are evaluated as the role of identity_sync.run_as (identity_sync_evaluator,
-- never a superuser), read-only and bounded in time. Configuration refuses what would write
-- and what that role may not read, before anything runs; what only shows at evaluation
-- (a function that writes, a runaway query) fails there, naming the expression.
-- The administrator here is not a superuser.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_iso_admin;
DROP ROLE IF EXISTS regress_iso_ann;

CREATE ROLE regress_iso_admin IN ROLE identity_sync_admin;

RESET client_min_messages;
\set SHOW_CONTEXT never
\set VERBOSITY default

-- the role, as CREATE EXTENSION made it
SHOW identity_sync.run_as;
SELECT rolsuper, rolcanlogin, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = 'identity_sync_evaluator';

CREATE TABLE person (id int PRIMARY KEY, given text NOT NULL);
CREATE TABLE job (person_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date);
CREATE TABLE dept (code text PRIMARY KEY, name text NOT NULL);
CREATE TABLE payroll (person_id int, salary int);   -- never granted to the evaluator
INSERT INTO person VALUES (1, 'Ann'), (2, 'Bob');
INSERT INTO job VALUES (1, 'S', '2020-01-01', NULL), (2, 'S', '2020-01-01', NULL);
INSERT INTO dept VALUES ('S', 'Sales');
INSERT INTO payroll VALUES (1, 100);
GRANT SELECT ON person, job, dept, payroll TO regress_iso_admin;
-- (a function that tries to make its caller a superuser, and one that writes)
CREATE FUNCTION promote() RETURNS text LANGUAGE plpgsql SECURITY INVOKER AS
    $$ BEGIN ALTER ROLE regress_iso_admin SUPERUSER; RETURN 'promoted'; END $$;
CREATE FUNCTION vandal() RETURNS text LANGUAGE plpgsql SECURITY INVOKER AS
    $$ BEGIN DELETE FROM job; RETURN 'deleted'; END $$;
GRANT EXECUTE ON FUNCTION promote(), vandal() TO PUBLIC;

-- A source the evaluator cannot read is refused, with the GRANT to give in the HINT.
SET ROLE regress_iso_admin;
SELECT identity_sync.add_person_source('person', 'id');
RESET ROLE;
GRANT SELECT ON person, job, dept TO identity_sync_evaluator;
SET ROLE regress_iso_admin;
SELECT identity_sync.add_person_source('person', 'id');
SELECT identity_sync.add_contract_source('job', 'person_id', 'starts', 'ends');
SET client_min_messages = warning;
SELECT identity_sync.add_target('t', 'webhook', 'http://127.0.0.1:9/', '{"dry_run": true, "statement_timeout": "300ms"}');
RESET client_min_messages;
SELECT identity_sync.add_rule('t', 'all', 'true');
SELECT identity_sync.map('t', 'login', 'lower(person.given)');

-- Reading what the evaluator may not: a server file, a directory, a table never granted.
SELECT identity_sync.map('t', 'passwd', $$pg_read_file('/etc/passwd')$$);
SELECT identity_sync.map('t', 'files', $$(SELECT string_agg(f, ',') FROM pg_ls_dir('.') AS f)$$);
SELECT identity_sync.add_rule('t', 'paid', $$EXISTS (SELECT FROM payroll p WHERE p.person_id = person.id)$$);
-- Writing: a second statement, a data-modifying WITH, row locks.
SELECT identity_sync.map('t', 'x', $$1); DELETE FROM job; SELECT (1$$);
SELECT identity_sync.map('t', 'x', $$(WITH d AS (DELETE FROM job RETURNING person_id) SELECT count(*) FROM d)$$);
SELECT identity_sync.add_rule('t', 'locked', $$EXISTS (SELECT FROM job j WHERE j.person_id = person.id FOR UPDATE)$$);
SELECT identity_sync.add_related_source('dept', $$, d AS (DELETE FROM job RETURNING person_id) SELECT person_id FROM d$$);
SELECT identity_sync.add_related_source('dept', $$SELECT j.person_id FROM job j JOIN changed c ON c.code = j.dept; DELETE FROM job$$);
SELECT identity_sync.add_related_source('dept', $$SELECT j.person_id FROM job j JOIN changed c ON c.code = j.dept FOR SHARE$$);
SELECT identity_sync.set_primary_contract($$contract.starts DESC; DELETE FROM job$$);
SELECT identity_sync.set_login($$(SELECT 'regress_iso_' || p.given FROM person p WHERE p.id = person.id FOR UPDATE)$$);
SELECT identity_sync.add_product('vpn', 't', '{vpn}', owners => $$owner.id IN (SELECT person_id FROM payroll)$$);
-- Nothing of that was configured, nothing ran: the data is whole.
SELECT attribute, expression FROM identity_sync.mapping ORDER BY 1;
SELECT name, condition FROM identity_sync.rule ORDER BY 1;
SELECT count(*) AS sources FROM identity_sync.source;
RESET ROLE;
SELECT (SELECT count(*) FROM job) AS jobs, (SELECT count(*) FROM person) AS persons;

-- What only shows when it runs fails there, naming the expression: a function that tries to
-- become superuser or to delete, a subquery that runs past the target's statement_timeout.
SET ROLE regress_iso_admin;
SELECT identity_sync.map('t', 'promoted', 'promote()');
SELECT target, in_scope, error FROM identity_sync.preview('1', 't');
SELECT identity_sync.unmap('t', 'promoted');
SELECT identity_sync.map('t', 'deleted', 'vandal()');
SELECT target, in_scope, error FROM identity_sync.preview('1', 't');
SELECT identity_sync.unmap('t', 'deleted');
SELECT identity_sync.map('t', 'slow', $$(SELECT pg_sleep(30))::text$$);
SELECT target, in_scope, error FROM identity_sync.preview('1', 't');
SELECT identity_sync.unmap('t', 'slow');
SELECT target, in_scope, attributes, error FROM identity_sync.preview('1', 't');
RESET ROLE;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_iso_admin';
SELECT (SELECT count(*) FROM job) AS jobs;

-- The option statement_timeout: a positive interval.
SET ROLE regress_iso_admin;
SELECT identity_sync.alter_target('t', options => '{"statement_timeout": "0"}');
SELECT identity_sync.alter_target('t', options => '{"statement_timeout": "-1 s"}');
SELECT identity_sync.alter_target('t', options => '{"statement_timeout": "soon"}');
SELECT identity_sync.alter_target('t', options => '{"statement_timeout": "1 min"}');
SELECT options->>'statement_timeout' FROM identity_sync.target WHERE name = 't';
RESET ROLE;

-- A related source's affected query and a self-service owners condition run isolated too.
SET ROLE regress_iso_admin;
SELECT identity_sync.add_related_source('dept', $$SELECT j.person_id FROM job j JOIN changed c ON c.code = j.dept$$);
SELECT identity_sync.set_login($$'regress_iso_' || lower(person.given)$$);
SELECT identity_sync.add_product('vpn', 't', '{vpn}', owners => $$owner.id = 2$$);
-- (an owners condition whose function writes passes the check, which runs nothing, and fails
-- when a login's request evaluates it)
SELECT identity_sync.add_product('share', 't', '{share}', owners => $$owner.id = 2 AND vandal() IS NOT NULL$$);
RESET ROLE;
CREATE ROLE regress_iso_ann;
SET ROLE regress_iso_ann;
SELECT identity_sync.current_person();
SELECT identity_sync.request_access('vpn', 'remote work') > 0 AS requested;
SELECT identity_sync.request_access('share', 'project');
RESET ROLE;
SELECT (SELECT count(*) FROM job) AS jobs;
UPDATE dept SET name = 'Sales and Marketing';
SELECT op, ARRAY(SELECT DISTINCT k FROM unnest(keys) AS k ORDER BY 1) AS persons FROM identity_sync.change WHERE op = 'update';
CREATE FUNCTION dept_vandal() RETURNS SETOF int LANGUAGE plpgsql SECURITY INVOKER AS
    $$ BEGIN DELETE FROM person WHERE id = 2; RETURN QUERY SELECT 1; END $$;
GRANT EXECUTE ON FUNCTION dept_vandal() TO PUBLIC;
SET ROLE regress_iso_admin;
SELECT identity_sync.drop_source('dept');
SELECT identity_sync.add_related_source('dept', $$SELECT dept_vandal()$$);
RESET ROLE;
UPDATE dept SET name = 'Sales';
SELECT count(*) AS persons FROM person;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE person, job, dept, payroll;
DROP FUNCTION promote(), vandal(), dept_vandal();
DROP ROLE regress_iso_admin, regress_iso_ann;
