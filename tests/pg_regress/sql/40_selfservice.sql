-- Self-service access requests as users see them in psql: products whose owners come from HR
-- data, requests and decisions by persons acting through their own roles (SET ROLE here; the
-- e2e test logs in), row-level security, the planner's desired state, expiry and the audit
-- trail. No worker serves the regression database: the planner and the expiry are called by
-- hand, as the worker calls them on every tick.
\set SHOW_CONTEXT never
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_emp_1, regress_emp_2, regress_emp_3, regress_emp_4, regress_emp_5, regress_outsider;
CREATE ROLE regress_emp_1;
CREATE ROLE regress_emp_2;
CREATE ROLE regress_emp_3;
CREATE ROLE regress_emp_4;
CREATE ROLE regress_emp_5;
CREATE ROLE regress_outsider;
-- HR: Ann (1) and Cid (3) work in sales, Bob (2) heads sales since 2023, Dee (4) headed sales
-- until 2022 and works in engineering now, Eve (5) heads engineering.
CREATE TABLE staff (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE post (staff_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date);
CREATE TABLE head (staff_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date NOT NULL);
GRANT SELECT ON staff, post, head TO identity_sync_evaluator;
INSERT INTO staff VALUES (1, 'Ann'), (2, 'Bob'), (3, 'Cid'), (4, 'Dee'), (5, 'Eve');
INSERT INTO post VALUES (1, 'S', '2020-01-01', NULL), (2, 'S', '2019-01-01', NULL), (3, 'S', '2021-01-01', NULL),
                        (4, 'S', '2018-01-01', '2022-12-31'), (4, 'E', '2023-01-01', NULL), (5, 'E', '2015-01-01', NULL);
INSERT INTO head VALUES (4, 'S', '2018-01-01', '2022-12-31'), (2, 'S', '2023-01-01', '9999-01-01'),
                        (5, 'E', '2015-01-01', '9999-01-01');
SELECT identity_sync.set_clock('2024-06-20 12:00+00');
SELECT identity_sync.add_person_source('staff', 'id');
SELECT identity_sync.add_contract_source('post', 'staff_id', 'starts', 'ends');
SELECT identity_sync.add_target('dir', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true}');
SELECT identity_sync.map('dir', 'login', 'lower(person.name)');
SELECT identity_sync.add_rule('dir', 'everyone', 'true', '{staff}');
SELECT identity_sync.resync('dir');
SELECT identity_sync._plan(100);
RESET client_min_messages;

-- A product: the VPN, approved by the head of the requester's department. Until set_login()
-- maps persons to roles, nobody can request it.
SELECT identity_sync.add_product('vpn', 'dir', '{vpn}',
    $$EXISTS (SELECT FROM head h WHERE h.staff_id = owner.id AND h.dept = requester_contract.dept
              AND today BETWEEN h.starts AND h.ends)$$,
    description => 'Remote access');
SET ROLE regress_emp_1;
SELECT identity_sync.request_access('vpn', 'working from home');
RESET ROLE;

-- Mistakes are caught when configuring, with their position.
SELECT identity_sync.add_product('x', 'dir', '{x}', 'owner.idd = requester.id');
SELECT identity_sync.add_product('x', 'dir', '{x}', 'owner.id');
SELECT identity_sync.add_product('x', 'dir', '{}', 'true');
SELECT identity_sync.add_product('x', 'dir', '{x}', 'true', approval => 'most');
SELECT identity_sync.add_product('x', 'dir', '{x}', 'true', valid_for => '-1 day');
SELECT identity_sync.add_product('x', 'nowhere', '{x}', 'true');
SELECT identity_sync.add_product('vpn', 'dir', '{x}', 'true');
SELECT identity_sync.set_login('person.id');
SELECT identity_sync.set_login($$'regress_emp_' || person.nmae$$);
SELECT identity_sync.set_login($$'regress_emp_' || length(person.name)::text$$);
SELECT identity_sync.set_login($$'regress_emp_' || person.id::text$$);

SELECT identity_sync.add_product('share', 'dir', '{share}',
    $$EXISTS (SELECT FROM head h WHERE h.staff_id = owner.id AND h.dept = requester_contract.dept
              AND today BETWEEN h.starts AND h.ends)$$,
    valid_for => '1 day', description => 'Project share');
SELECT identity_sync.add_product('lab', 'dir', '{lab,lab-admins}', 'owner.id IN (2, 5)', approval => 'all');
SELECT * FROM identity_sync.products ORDER BY product;

-- Ann requests the VPN for herself.
SET ROLE regress_emp_1;
SELECT identity_sync.current_person();
SELECT identity_sync.request_access('vpn', 'working from home');
SELECT identity_sync.request_access('vpn', 'twice');
SELECT identity_sync.request_access('vpm');
-- Nobody approves their own request, only a current owner can approve: not a colleague, not the
-- former head, not a role that is nobody's login.
SELECT identity_sync.approve(1, 'fine by me');
SET ROLE regress_emp_3;
SELECT identity_sync.approve(1, 'colleague');
SET ROLE regress_emp_4;
SELECT identity_sync.approve(1, 'I used to decide this');
SET ROLE regress_outsider;
SELECT identity_sync.approve(1);
SELECT count(*) FROM identity_sync.my_requests;
-- Bob, head of sales, sees it and approves.
SET ROLE regress_emp_2;
SELECT request_id, product, requester, requester_role, reason, state, can_decide FROM identity_sync.my_approvals;
SELECT identity_sync.approve(1, 'ok');
SELECT identity_sync.approve(1, 'again');
RESET ROLE;

-- The planner adds the approved groups to Ann's desired state.
SELECT groups FROM identity_sync.preview('1', 'dir');
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';
SET ROLE regress_emp_1;
SELECT request_id, product, state, decided_at, decisions, grant_status, grant_detail FROM identity_sync.my_requests;
RESET ROLE;

-- Approval "all": every current owner must approve.
SET ROLE regress_emp_1;
SELECT identity_sync.request_access('lab', 'load tests');
SET ROLE regress_emp_2;
SELECT identity_sync.approve(2, 'yes');
SELECT identity_sync.approve(2, 'yes again');
SET ROLE regress_emp_5;
SELECT request_id, approvals, can_decide, grant_status, grant_detail FROM identity_sync.my_approvals;
SELECT identity_sync.approve(2, 'yes');
RESET ROLE;

-- Denied, and withdrawn by the requester.
SET ROLE regress_emp_3;
SELECT identity_sync.request_access('vpn', 'me too');
SELECT identity_sync.request_access('share', 'a look');
SET ROLE regress_emp_2;
SELECT identity_sync.deny(3, 'no need');
SET ROLE regress_emp_3;
SELECT identity_sync.revoke(4);
SELECT request_id, product, state, grant_status FROM identity_sync.my_requests ORDER BY 1;
RESET ROLE;

-- Owners are computed when deciding. A temporary table cannot stand in for HR data, and when
-- Bob stops heading sales (yesterday), he can no longer approve today.
SET ROLE regress_emp_1;
SELECT identity_sync.request_access('share', 'project x');
SET ROLE regress_emp_3;
CREATE TEMP TABLE head AS SELECT 3 AS staff_id, 'S'::text AS dept, date '2000-01-01' AS starts, date '9999-01-01' AS ends;
SELECT identity_sync.approve(5, 'trust me');
DROP TABLE pg_temp.head;
RESET ROLE;
UPDATE head SET ends = '2024-06-19' WHERE staff_id = 2;
SET ROLE regress_emp_2;
SELECT identity_sync.can_approve(5);
SELECT request_id FROM identity_sync.my_approvals WHERE can_decide;
SELECT identity_sync.approve(5, 'still me');
RESET ROLE;
UPDATE head SET ends = '9999-01-01' WHERE staff_id = 2;
SET ROLE regress_emp_2;
SELECT identity_sync.can_approve(5);
SELECT identity_sync.approve(5, 'back again');
RESET ROLE;
SELECT request_id, state, decided_at, expires_at FROM identity_sync.requests WHERE request_id = 5;

-- Row-level security: each login reads its own requests, the ones it decides, its decisions.
SET ROLE regress_emp_1;
SELECT request_id, product, state FROM identity_sync.my_requests ORDER BY 1;
SELECT request_id FROM identity_sync.my_approvals;
SELECT id, person_key, state FROM identity_sync.request ORDER BY id;
SELECT request_id, person_key, decision FROM identity_sync.decision ORDER BY 1, 2;
SET ROLE regress_emp_2;
SELECT count(*) FROM identity_sync.my_requests;
SELECT request_id, requester, state, can_decide, my_decision, my_comment FROM identity_sync.my_approvals ORDER BY 1;
SELECT id, person_key, state FROM identity_sync.request ORDER BY id;
SELECT request_id, person_key, decision FROM identity_sync.decision ORDER BY 1, 2;
SET ROLE regress_emp_3;
SELECT request_id, product, state FROM identity_sync.my_requests ORDER BY 1;
SELECT count(*) FROM identity_sync.my_approvals;
SELECT id, person_key, state FROM identity_sync.request ORDER BY id;
SELECT * FROM identity_sync.grant_status(1);
-- Nobody writes the tables or reads what is not theirs.
UPDATE identity_sync.request SET state = 'approved' WHERE id = 3;
INSERT INTO identity_sync.decision VALUES (3, '3', 'regress_emp_3', '3', 'approve', NULL, now());
SELECT owners FROM identity_sync.product;
SELECT count(*) FROM identity_sync.requests;
SELECT count(*) FROM identity_sync.account;
RESET ROLE;

-- A grant with valid_for expires when its time has passed: the worker calls _expire_grants()
-- on every tick, then plans the person; the group is revoked.
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';
SELECT identity_sync.set_clock('2024-06-22 12:00+00');
SELECT identity_sync._expire_grants();
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';
SELECT person_key, kind, payload FROM identity_sync.events WHERE person_key = '1' AND kind IN ('grant', 'revoke') ORDER BY seq;
SET ROLE regress_emp_1;
SELECT request_id, product, state, expires_at, ended_at, ended_by, grant_status FROM identity_sync.my_requests ORDER BY 1;
-- Ann may ask again.
SELECT identity_sync.request_access('share', 'project y');
RESET ROLE;

-- Revoking: the requester, a current owner or an admin; nobody else.
SET ROLE regress_emp_3;
SELECT identity_sync.revoke(2);
SET ROLE regress_emp_5;
SELECT identity_sync.revoke(2);
SET ROLE regress_emp_1;
SELECT identity_sync.revoke(1);
SELECT identity_sync.revoke(1);
RESET ROLE;
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';

-- A leaver's grant is withheld: Cid gets the VPN, then his post ends.
SET ROLE regress_emp_3;
SELECT identity_sync.request_access('vpn', 'second try');
SET ROLE regress_emp_2;
SELECT identity_sync.approve(7, 'ok now');
RESET ROLE;
SELECT identity_sync._plan(100);
SELECT person_key, state, groups FROM identity_sync.accounts WHERE person_key = '3';
UPDATE post SET ends = '2024-06-21' WHERE staff_id = 3;
SELECT identity_sync._plan(100);
SELECT person_key, state, groups FROM identity_sync.accounts WHERE person_key = '3';
SELECT request_id, state, grant_status, grant_detail FROM identity_sync.requests WHERE request_id = 7;

-- Every request, decision and expiry is in the audit trail, with who (the role) and when.
SELECT actor, action, object, new->>'state' AS state, new->>'approver' AS approver, new->>'comment' AS comment
  FROM identity_sync.audit_log WHERE object LIKE 'request %' ORDER BY id;
SELECT count(*) AS without_time FROM identity_sync.audit_log WHERE object LIKE 'request %' AND at IS NULL;

-- PUBLIC gets exactly the self-service entry points, SECURITY DEFINER with a fixed search_path,
-- and reads the catalog and its own rows (row-level security on request and decision).
SELECT p.oid::regprocedure AS public_function, p.prosecdef, p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'identity_sync'::regnamespace AND has_function_privilege('regress_outsider', p.oid, 'EXECUTE')
 ORDER BY 1;
SELECT c.oid::regclass AS public_relation, c.relkind, c.relrowsecurity, c.reloptions,
       has_table_privilege('regress_outsider', c.oid, 'SELECT') AS all_columns,
       has_table_privilege('regress_outsider', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS writes
  FROM pg_class c
 WHERE c.relnamespace = 'identity_sync'::regnamespace AND has_any_column_privilege('regress_outsider', c.oid, 'SELECT, INSERT, UPDATE')
 ORDER BY 1;

-- Changing a product's groups changes every approved grant; dropping it revokes them.
SET ROLE regress_emp_2;
SELECT identity_sync.approve(6, 'for project y');
RESET ROLE;
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';
SELECT identity_sync.alter_product('share', groups => '{share,share-readers}', description => 'Project share (read and write)');
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';
SELECT identity_sync.drop_product('share');
SELECT identity_sync._plan(100);
SELECT person_key, groups FROM identity_sync.accounts WHERE person_key = '1';
SELECT count(*) FROM identity_sync.request;
SELECT action, object FROM identity_sync.audit_log WHERE action LIKE '%product' ORDER BY id;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE staff, post, head;
DROP ROLE regress_emp_1, regress_emp_2, regress_emp_3, regress_emp_4, regress_emp_5, regress_outsider;
