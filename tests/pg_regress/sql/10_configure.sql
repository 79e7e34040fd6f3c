-- The configuration API as an identity engineer uses it: sources, a target, mappings, rules,
-- and the errors that catch mistakes at configuration time.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
RESET client_min_messages;
-- CONTEXT lines name our functions' line numbers; DETAIL and HINT are the contract.
\set SHOW_CONTEXT never
\set VERBOSITY default

CREATE SCHEMA hr;
CREATE TABLE hr.person (id int PRIMARY KEY, given text NOT NULL, family text NOT NULL, hired date NOT NULL);
CREATE TABLE hr.contract (person_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date);
CREATE TABLE hr.dept (code text PRIMARY KEY, name text NOT NULL);
-- identity_sync reads sources and evaluates expressions as identity_sync_evaluator (README, Security)
GRANT USAGE ON SCHEMA hr TO identity_sync_evaluator;
GRANT SELECT ON ALL TABLES IN SCHEMA hr TO identity_sync_evaluator;
INSERT INTO hr.dept VALUES ('S', 'Sales'), ('E', 'Engineering');
INSERT INTO hr.person VALUES
    (1, 'Zoë', 'Ångström-Çelik', '2019-03-01'),
    (2, 'Jan', 'van der Berg', '1988-01-15'),
    (3, 'Jan', 'van der Berg', '2021-09-01'),
    (4, 'Future', 'Hire', '2024-07-01');
INSERT INTO hr.contract VALUES
    (1, 'S', '2019-03-01', NULL),
    (2, 'E', '1988-01-15', '2023-12-31'),
    (3, 'S', '2021-09-01', NULL),
    (4, 'E', '2024-07-01', NULL);

SELECT identity_sync.set_search_path('hr, public');
SELECT identity_sync.set_clock('2024-06-20 12:00+00');

-- sources
SELECT identity_sync.add_person_source('hr.person', 'id');
SELECT identity_sync.add_contract_source('hr.contract', 'person_id', 'starts', 'ends');
SELECT relation, role, key_column, starts_column, ends_column, capture FROM identity_sync.source ORDER BY id;

-- mistakes
SELECT identity_sync.add_person_source('hr.person', 'id');
SELECT identity_sync.add_contract_source('hr.nope', 'person_id', 'starts', 'ends');
SELECT identity_sync.add_related_source('hr.dept', 'SELECT 1, 2 FROM changed');
SELECT identity_sync.add_related_source('hr.dept', 'SELECT person_id FROM hr.contract JOIN changed USING (dept)');
SELECT identity_sync.add_related_source('hr.dept', 'SELECT c.person_id FROM hr.contract c JOIN changed d ON d.code = c.dept');
SELECT relation, role FROM identity_sync.source ORDER BY id;

-- the person document
SELECT jsonb_pretty(identity_sync.person('2'));

-- a target
SELECT identity_sync.add_target('crm', 'scim', 'http://127.0.0.1:9/scim/v2', '{"auth": "bearer", "create_before": "30 days", "dry_run": true}');
SELECT identity_sync.add_target('bad', 'scim', 'http://127.0.0.1:9/scim/v2', '{"color": "red"}');
SELECT identity_sync.add_target('bad', 'scim', 'http://127.0.0.1:9/scim/v2', '{"max_concurrency": "lots"}');
SELECT identity_sync.add_target('bad', 'scim', 'ftp://nowhere');
SELECT identity_sync.add_target('bad', 'ldap');

-- mappings and rules
SELECT identity_sync.map('crm', 'userName',
    $$identity_sync.slug(person.given || '.' || person.family) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$,
    on_create_only => true, is_unique => true);
SELECT identity_sync.map('crm', 'name.givenName', $$identity_sync.normalize_diacritics(person.given)$$);
SELECT identity_sync.map('crm', 'name.familyName', $$person.family$$);
SELECT identity_sync.map('crm', 'emails[type eq "work"].value', $$identity_sync.slug(person.given || '.' || person.family) || '@example.com'$$);
SELECT identity_sync.map('crm', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department', $$(SELECT name FROM dept WHERE code = contract.dept)$$);
SELECT identity_sync.add_rule('crm', 'sales', $$contract.dept = 'S'$$, '{Sales}');
SELECT identity_sync.add_rule('crm', 'veterans', $$person.hired < '1990-01-01'$$, '{Veterans}');
SELECT identity_sync.add_rule('crm', 'engineers', $$EXISTS (SELECT 1 FROM unnest(contracts) c WHERE c.dept = 'E')$$, '{Engineering}');

-- mistakes in expressions are caught now, with the position inside the expression
SELECT identity_sync.map('crm', 'title', $$person.titel$$);
SELECT identity_sync.map('crm', 'title', $$upper(person.given$$);
SELECT identity_sync.map('crm', 'name..bad', $$person.given$$);
SELECT identity_sync.add_rule('crm', 'oops', $$person.hired < 1990$$);
SELECT identity_sync.add_rule('crm', 'oops', $$person.given$$);
SELECT attribute, on_create_only, is_unique FROM identity_sync.mapping ORDER BY position;
SELECT name, condition, groups FROM identity_sync.rule ORDER BY name;

-- the helpers
SELECT identity_sync.normalize_diacritics('Zoë Ångström-Çelik, Straße, Øre, Łódź, Işık');
SELECT identity_sync.slug('  Zoë  Ångström-Çelik ');
SELECT * FROM identity_sync.name_variants('Jan', 'van der Berg');

-- who did what
SELECT action, object, actor = current_user AS by_me FROM identity_sync.audit_log ORDER BY id;

-- several sources: a board register kept in a spreadsheet, loaded into a table
CREATE TABLE hr.board (member_no text PRIMARY KEY, given text NOT NULL, family text NOT NULL, email text, seat text);
CREATE TABLE hr.board_link (member_no text NOT NULL, person_id int NOT NULL);   -- who is also staff
CREATE TABLE hr.vendor (id text PRIMARY KEY, given text, source text);
GRANT SELECT ON hr.board, hr.board_link, hr.vendor TO identity_sync_evaluator;
INSERT INTO hr.board VALUES ('B1', 'Jan', 'van der Berg', 'jan@board.example', 'chair'), ('B2', 'Ada', 'Byron', NULL, 'member');
INSERT INTO hr.board_link VALUES ('B1', 3);
-- the rule engineers reads contracts as rows: with several sources they are jsonb records
SELECT identity_sync.add_person_source('hr.board', 'member_no', source => 'board', priority => 10);
SELECT identity_sync.drop_rule('crm', 'engineers');
SELECT identity_sync.add_person_source('hr.board', 'member_no', source => 'board', priority => 10);
SELECT identity_sync.add_rule('crm', 'engineers', $$EXISTS (SELECT 1 FROM jsonb_array_elements(contracts) c WHERE c->>'dept' = 'E')$$, '{Engineering}');
SELECT relation, role, name, priority FROM identity_sync.source WHERE role <> 'related' ORDER BY id;
-- every record carries its source's name as "source": a column of that name is refused
SELECT identity_sync.add_person_source('hr.vendor', 'id', source => 'vendor');
-- persons are their own until a match rule (here an explicit link table) joins them
SELECT source, source_key, person_key FROM identity_sync._person_link ORDER BY 1, 2;
SELECT identity_sync.person('board:B1');
SELECT identity_sync.set_person_match($$EXISTS (SELECT FROM hr.board_link l WHERE l.person_id = a.id AND l.member_no = b.member_no)$$);
SELECT source, source_key, person_key FROM identity_sync._person_link ORDER BY 1, 2;
SELECT identity_sync.person('3');
SELECT identity_sync.person('board:B2');
SELECT * FROM identity_sync.merge_conflicts;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP SCHEMA hr CASCADE;
