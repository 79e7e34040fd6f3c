-- Bad input, as a user meets it: every public function given wrong relations, columns, types,
-- keys, options, names, paths and expressions, stacked statements and injection attempts. Each
-- case is one call that must fail with an ERROR of its own SQLSTATE (echoed after it: never
-- XX000, never 00000), a lower-case message and a DETAIL or HINT where they help; at the end,
-- the configuration and the HR data are exactly what they were before the corpus.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
RESET client_min_messages;
-- CONTEXT lines name our functions' line numbers; DETAIL and HINT are the contract.
\set SHOW_CONTEXT never
\set VERBOSITY default

------------------------------------------------------------------------------------------------
-- HR data and a valid configuration
------------------------------------------------------------------------------------------------
CREATE SCHEMA hr;
CREATE TABLE hr.person (id int PRIMARY KEY, given text NOT NULL, family text NOT NULL, email text, hired date NOT NULL);
CREATE TABLE hr.contract (person_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date, label text);
CREATE TABLE hr.dept (code text PRIMARY KEY, name text NOT NULL);
CREATE TABLE hr.other (id int PRIMARY KEY);
CREATE TABLE hr.contract_text (person_id text NOT NULL, starts date NOT NULL, ends date);
CREATE VIEW hr.person_view AS SELECT * FROM hr.person;
CREATE SEQUENCE hr.seq;
CREATE TABLE hr.app_users (person_key text PRIMARY KEY, login text, active boolean, title int);
INSERT INTO hr.dept VALUES ('S', 'Sales'), ('E', 'Engineering');
INSERT INTO hr.person VALUES (1, 'Ann', 'Lee', 'ann@example.com', '2019-03-01'),
                             (2, 'Bob', 'Ng', NULL, '2020-01-01'),
                             (3, 'Cy', 'Oh', NULL, '2021-01-01');
INSERT INTO hr.contract VALUES (1, 'S', '2019-03-01', NULL, 'a'), (2, 'E', '2020-01-01', NULL, 'b'),
                               (3, 'E', '2021-01-01', '2030-12-31', 'c');
-- the role user SQL runs as reads the HR schema (README, User SQL: what runs as whom)
GRANT USAGE ON SCHEMA hr TO identity_sync_evaluator;
GRANT SELECT ON ALL TABLES IN SCHEMA hr TO identity_sync_evaluator;
CREATE ROLE regress_ann;   -- the login of person 1

-- what the corpus must leave untouched
CREATE TEMP VIEW hr_digest AS
SELECT md5((SELECT string_agg(p::text, ',' ORDER BY id) FROM hr.person p)
        || (SELECT string_agg(c::text, ',' ORDER BY person_id) FROM hr.contract c)
        || (SELECT string_agg(d::text, ',' ORDER BY code) FROM hr.dept d)
        || (SELECT count(*) FROM hr.app_users)::text
        || (SELECT count(*) FROM hr.contract_text)::text) AS digest;
CREATE TEMP VIEW config_digest AS
SELECT md5(concat_ws('|',
    (SELECT string_agg(to_jsonb(s)::text, ',' ORDER BY id) FROM identity_sync.source s),
    (SELECT string_agg((to_jsonb(t) - 'updated_at')::text, ',' ORDER BY id) FROM identity_sync.target t),
    (SELECT string_agg(to_jsonb(m)::text, ',' ORDER BY position) FROM identity_sync.mapping m),
    (SELECT string_agg(to_jsonb(r)::text, ',' ORDER BY target_id, name) FROM identity_sync.rule r),
    (SELECT string_agg(to_jsonb(p)::text, ',' ORDER BY id) FROM identity_sync.product p),
    (SELECT string_agg(to_jsonb(r)::text, ',' ORDER BY id) FROM identity_sync.request r),
    (SELECT count(*) FROM identity_sync._secret)::text,
    (SELECT to_jsonb(s)::text FROM identity_sync._settings s),
    (SELECT count(*) FROM identity_sync.event)::text,
    (SELECT count(*) FROM identity_sync.account)::text,
    (SELECT count(*) FROM identity_sync._audit)::text,
    (SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger
      WHERE tgrelid::regclass::text LIKE 'hr.%' AND NOT tgisinternal),
    (SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index
      WHERE indrelid::regclass::text LIKE 'hr.%'))) AS digest;

SET client_min_messages = warning;
SELECT identity_sync.set_search_path('hr, public');
SELECT identity_sync.add_person_source('hr.person', 'id');
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'starts', 'ends');
SELECT identity_sync.add_related_source('hr.dept', 'SELECT c.person_id FROM hr.contract c JOIN changed d ON d.code = c.dept');
SELECT identity_sync.add_target('dir', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true}');
SELECT identity_sync.map('dir', 'name', $$person.given || ' ' || person.family$$);
SELECT identity_sync.add_rule('dir', 'everyone', 'true', '{staff}');
SELECT identity_sync.add_target('crm', 'scim', 'http://127.0.0.1:9/scim/v2', '{"dry_run": true}');
SELECT identity_sync.map('crm', 'userName', $$lower(person.given)$$);
SELECT identity_sync.add_rule('crm', 'sales', $$contract.dept = 'S'$$, '{sales}');
SELECT identity_sync.add_target('app', 'table', NULL, '{"relation": "hr.app_users", "key_column": "person_key", "active_column": "active", "dry_run": true}');
SELECT identity_sync.map('app', 'login', $$lower(person.given)$$);
SELECT identity_sync.add_rule('app', 'everyone', 'true');
SELECT identity_sync.set_login($$CASE person.id WHEN 1 THEN 'regress_ann' END$$);
SELECT identity_sync.add_product('vpn', 'dir', '{vpn}', $$owner.id = 2$$);
RESET client_min_messages;

SELECT digest AS hr_before FROM hr_digest \gset
SELECT digest AS config_before FROM config_digest \gset

------------------------------------------------------------------------------------------------
-- Sources: wrong relations, columns, types, keys that are not unique, duplicates
------------------------------------------------------------------------------------------------
SELECT identity_sync.drop_source('hr.nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.drop_source('hr.other');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.drop_source(NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_person_source('hr.person', 'id');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_person_source('hr.other', 'id');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_contract_source('hr.other', 'id', 'id', 'id');
\echo SQLSTATE :SQLSTATE
-- several sources: names, priorities, the match rule, merge conflicts
SELECT identity_sync.add_person_source('hr.other', 'id', source => 'default', priority => 50);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_person_source('hr.other', 'id', source => '');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_person_source('hr.other', 'id', source => 'vendor:x');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_person_source('hr.other', 'id', source => E'ven\ndor');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_person_source('hr.other', 'id', source => 'vendor', priority => NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_contract_source('hr.contract_text', 'person_id', 'starts', 'ends', source => 'vendor');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_contract_source('hr.contract_text', 'person_id', 'starts', 'ends', source => NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_person_match('a.email');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_person_match('a.id + b.id');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_person_match('a.national_id = b.national_id');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_person_match('a.id = b.id; DROP TABLE hr.person');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_person_match('a.id = b.id) OR (true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_person_match('count(*) > 0');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.resolve_merge_conflict('1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.resolve_merge_conflict(NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.dept', 'SELECT 1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.seq', 'SELECT 1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.person_view', 'SELECT id FROM changed');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source(NULL, 'SELECT 1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', 'SELECT id, id FROM changed');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', 'SELECT nope FROM changed');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', 'SELEC id FROM changed');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', 'SELECT id FROM changed; DROP TABLE hr.person');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', ', gone AS (DELETE FROM hr.person RETURNING id) SELECT id FROM gone');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', 'SELECT id FROM changed) AS a, pg_sleep(10) AS b --');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_related_source('hr.other', 'SELECT person_id FROM hr.contract WHERE label = ''x');
\echo SQLSTATE :SQLSTATE

-- a fresh database's view of the same mistakes: the sources above are dropped in a
-- subtransaction, then each registration is tried again with a mistake
BEGIN;
SET LOCAL client_min_messages = warning;
SELECT identity_sync.set_login(NULL);
SELECT identity_sync.drop_product('vpn');
SELECT identity_sync.drop_target(name) FROM identity_sync.target;
SELECT identity_sync.drop_source('hr.dept');
SELECT identity_sync.drop_source('hr.contract');
SELECT identity_sync.drop_source('hr.person');
RESET client_min_messages;
SAVEPOINT s;
SELECT identity_sync.add_person_source('hr.nope', 'id');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person; DROP TABLE hr.person', 'id');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.seq', 'id');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person', 'nope');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person', 'ID');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person', 'id"; DROP TABLE hr.person; --');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person', 'given');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person', NULL);
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source(NULL, 'id');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_contract_source('hr.contract_text', 'person_id', 'starts', 'ends');
SELECT identity_sync.add_person_source('hr.person', 'id');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s;
SELECT identity_sync.add_person_source('hr.person', 'id');
SAVEPOINT s2;
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'label', 'ends');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s2;
SELECT identity_sync.add_contract_source('hr.contract_text', 'person_id', 'starts', 'ends');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s2;
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'starts', 'finish');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s2;
SELECT identity_sync.add_contract_source('hr.contract', 'nope', 'starts', 'ends');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s2;
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', NULL, 'ends');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s2;
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'starts', 'ends) ; DROP TABLE hr.person; --');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s2;
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'starts', 'ends');
SAVEPOINT s3;
SELECT identity_sync.set_primary_contract('contract.nope DESC');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s3;
SELECT identity_sync.set_primary_contract('contract.starts DESC; DROP TABLE hr.person');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s3;
SELECT identity_sync.set_primary_contract('count(*) DESC');
\echo SQLSTATE :SQLSTATE
ROLLBACK TO s3;
SELECT identity_sync.set_primary_contract('contract.starts DESC LIMIT 0) x; SELECT (1');
\echo SQLSTATE :SQLSTATE
ROLLBACK;

------------------------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------------------------
SELECT identity_sync.set_search_path('hr, "unclosed');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_search_path('nowhere');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_search_path('hr; DROP TABLE hr.person');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_search_path(NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_clock('next tuesday');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_snapshot_interval('hr.person', '1 minute');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_snapshot_interval('hr.nope', '1 minute');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_snapshot_interval('hr.person', '-1 minute');
\echo SQLSTATE :SQLSTATE

------------------------------------------------------------------------------------------------
-- Targets: kinds, urls, names, malformed options
------------------------------------------------------------------------------------------------
SELECT identity_sync.add_target('dir', 'webhook', 'http://127.0.0.1:9/hook');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'ldap', 'ldap://127.0.0.1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target(NULL, 'webhook', 'http://127.0.0.1:9/');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('', 'webhook', 'http://127.0.0.1:9/');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target(E'x\nLOG:  forged', 'webhook', 'http://127.0.0.1:9/');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'ftp://127.0.0.1/');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://hooks.example.com/');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"colour": "red"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"correlate_on": "externalId"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '[{"dry_run": true}]');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '"dry_run"');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"timeout": "soon"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"timeout": "-5 s"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"timeout": "0"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"disable_after": "-1 day"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"delete_after": ["90 days"]}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"max_disables": "150%"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"max_deletes": -3}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"max_creates": "many"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"max_concurrency": 0}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"max_concurrency": 2.5}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"max_response_bytes": -1}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"auth": "kerberos"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"auth": {"type": "bearer"}}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"dry_run": "yes"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/', '{"secret_file": "token.txt"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"adopt": true}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"correlate_on": "emails[type eq work].value"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"auth": "basic"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"auth": "oauth2", "client_id": "me"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"auth": "oauth2", "client_id": "me", "token_url": "http://idp.example.com/token"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"orphans": "shred"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'scim', 'http://127.0.0.1:9/', '{"reconcile_every": "-1 hour"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', 'http://127.0.0.1:9/', '{"relation": "hr.app_users", "key_column": "person_key"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.app_users"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.nope", "key_column": "person_key"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.app_users; DROP TABLE hr.person", "key_column": "person_key"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.app_users", "key_column": "nope"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.app_users", "key_column": "person_key\"; DROP TABLE hr.person; --"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.app_users", "key_column": "person_key", "active_column": "active = true OR true"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.app_users", "key_column": "person_key", "active_column": "title"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_target('x', 'table', NULL, '{"relation": "hr.seq", "key_column": "person_key"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_target('nope', options => '{"dry_run": true}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_target('dir', options => '{"timeout": "forever"}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_target('dir', url => 'mailto:root@localhost');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_target('dir', new_name => 'crm');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_target('dir', new_name => '');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.drop_target('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_secret('nope', 'the-token');
\echo SQLSTATE :SQLSTATE

------------------------------------------------------------------------------------------------
-- Mappings: attributes, SCIM paths, expressions
------------------------------------------------------------------------------------------------
SELECT identity_sync.map('nope', 'name', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', '', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', NULL, 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('crm', 'name..givenName', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('crm', 'emails[type eq "work".value', 'person.email');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('crm', 'emails[type ne "work"].value', 'person.email');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('crm', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('crm', 'name.givenName"; DROP TABLE hr.person; --', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('app', 'nope', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('app', 'login"; DROP TABLE hr.person; --', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'person.givn');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'upper(person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'uper(person.given)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'employee.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', '');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'person.given); DROP TABLE hr.person; SELECT (1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', $$person.given || ''); DROP TABLE hr.person; --$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'person.given) AS v FROM hr.person; DELETE FROM hr.person; SELECT (1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'person.given) || (person.family');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'upper((person.given)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'generate_series(1, 3)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'unnest(contracts)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'string_agg(person.given, '','')');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'count(*)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'row_number() OVER ()');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'person.given /* unclosed');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', $q$$x$ || person.given$q$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', $$person.given || 'unclosed$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.map('dir', 'name', 'person."given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.unmap('dir', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.unmap('nope', 'name');
\echo SQLSTATE :SQLSTATE

------------------------------------------------------------------------------------------------
-- Rules
------------------------------------------------------------------------------------------------
SELECT identity_sync.add_rule('dir', 'everyone', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', '', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', 'person.given');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', $$contract.dept = 'S'; DROP TABLE hr.person$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', 'person.hired < 2020');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', 'count(*) > 0');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', 'unnest(ARRAY[true, false])');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', E'x\ny', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', 'EXISTS (SELECT FROM hr.nope)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('dir', 'x', 'true', '{staff, NULL}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_rule('nope', 'x', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.drop_rule('dir', 'nope');
\echo SQLSTATE :SQLSTATE

------------------------------------------------------------------------------------------------
-- Self-service: login, products, requests
------------------------------------------------------------------------------------------------
SELECT identity_sync.set_login('person.id');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_login($$'emp_' || person.nope$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_login($$'x'; DROP TABLE hr.person$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_login($$'same'$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.set_login($$'emp_' || generate_series(1, 2)$$);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('vpn', 'dir', '{vpn}', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'nope', '{vpn}', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{}', 'true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{vpn}', 'owner.nope = 1');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{vpn}', 'owner.id');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{vpn}', 'true; DELETE FROM hr.person');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{vpn}', 'bool_or(owner.id = 2)');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{vpn}', 'true', approval => 'most');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.add_product('x', 'dir', '{vpn}', 'true', valid_for => '-1 day');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_product('nope', '{vpn}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_product('vpn', new_name => '');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_product('vpn', groups => '{vpn, ""}');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.alter_product('vpn', owners => 'owner.id = 2) OR (true');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.drop_product('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.request_access('vpn', 'no login');
\echo SQLSTATE :SQLSTATE
SET ROLE regress_ann;
SELECT identity_sync.approve(424242, 'unknown request');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.deny(424242, 'unknown request');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.revoke(424242);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.request_access('nope', 'unknown product');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.request_access($$vpn'); DELETE FROM hr.person; --$$, 'injection');
\echo SQLSTATE :SQLSTATE
RESET ROLE;

------------------------------------------------------------------------------------------------
-- Operations
------------------------------------------------------------------------------------------------
SELECT identity_sync.pause('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.resume('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.release('dir');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.discard('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.retry('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.retry('424242');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.skip(424242);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.resync('nope');
\echo SQLSTATE :SQLSTATE
SELECT * FROM identity_sync.preview('1', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.person('one');
\echo SQLSTATE :SQLSTATE
SELECT * FROM identity_sync.preview('one', 'dir');
\echo SQLSTATE :SQLSTATE
SELECT * FROM identity_sync.preview(NULL);
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.reconcile('nope');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.reconcile('dir');
\echo SQLSTATE :SQLSTATE
SELECT identity_sync.reconcile('crm', 'fix');
\echo SQLSTATE :SQLSTATE

------------------------------------------------------------------------------------------------
-- Nothing half-configured, nothing written
------------------------------------------------------------------------------------------------
SELECT digest = :'hr_before' AS hr_data_unchanged FROM hr_digest;
SELECT digest = :'config_before' AS configuration_unchanged FROM config_digest;
SELECT relation, role FROM identity_sync.source ORDER BY id;
SELECT name, kind FROM identity_sync.target ORDER BY id;
SELECT t.name AS target, m.attribute, m.expression FROM identity_sync.mapping m JOIN identity_sync.target t ON t.id = m.target_id ORDER BY m.position;
SELECT t.name AS target, r.name AS rule, r.condition FROM identity_sync.rule r JOIN identity_sync.target t ON t.id = r.target_id ORDER BY 1, 2;
SELECT name FROM identity_sync.product ORDER BY id;
SELECT count(*) AS requests FROM identity_sync.request;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP SCHEMA hr CASCADE;
DROP ROLE regress_ann;
