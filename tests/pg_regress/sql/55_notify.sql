-- Notifications as users see them in psql: rules checked when configured (errors with their
-- position), notices written by the plan that caused them (none when it rolls back), skipped
-- ones, dry-run targets, digests, one notice per hold, the worker's claim and record, trace,
-- status and the audit log. No worker serves the regression database: _plan, _claim_notices
-- and _record_notices are called by hand, as the worker calls them.
\set SHOW_CONTEXT never
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
-- HR: Ann (1) works in sales, Bob (2) heads sales; engineering has no head.
CREATE TABLE staff (id int PRIMARY KEY, name text NOT NULL, mail text);
CREATE TABLE post (staff_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date);
CREATE TABLE head (staff_id int NOT NULL, dept text NOT NULL);
GRANT SELECT ON staff, post, head TO identity_sync_evaluator;
INSERT INTO staff VALUES (1, 'Ann', 'ann@example.com'), (2, 'Bob', 'bob@example.com');
INSERT INTO post VALUES (1, 'S', '2020-01-01', NULL), (2, 'S', '2019-01-01', NULL);
INSERT INTO head VALUES (2, 'S');
SELECT identity_sync.set_clock('2024-06-20 12:00+00');
SELECT identity_sync.add_person_source('staff', 'id');
SELECT identity_sync.add_contract_source('post', 'staff_id', 'starts', 'ends');
SELECT identity_sync.add_target('app', 'webhook', 'http://127.0.0.1:9/hook', '{"max_disables": 1}');
SELECT identity_sync.add_target('dry', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true}');
SELECT identity_sync.map('app', 'login', 'lower(person.name)');
SELECT identity_sync.map('dry', 'login', 'lower(person.name)');
SELECT identity_sync.add_rule('app', 'everyone', 'true');
SELECT identity_sync.add_rule('dry', 'everyone', 'true');
SELECT identity_sync.resync('app');
SELECT identity_sync.resync('dry');
SELECT identity_sync._plan(100);
RESET client_min_messages;

-- The head of the new hire's department is told the login.
SELECT identity_sync.add_notification('hire', 'create',
    recipients => $$(SELECT s.mail FROM head h JOIN staff s ON s.id = h.staff_id WHERE h.dept = contract.dept)$$,
    subject => $$format('%s joins %s', person.name, contract.dept)$$,
    body => $$format('Login: %s (target %s)', event->'attributes'->>'login', target->>'name')$$,
    options => '{"smtp_url": "smtp://127.0.0.1:2525", "from": "idm@example.com"}');
SELECT name, on_event, target, channel, options FROM identity_sync.notifications;

-- Mistakes are caught when configured, with the position inside the expression.
SELECT identity_sync.add_notification('x', 'hired', '''ops@example.com''', '''s''', '''b''');
SELECT identity_sync.add_notification('x', 'create', 'person.id', '''s''', '''b''');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', $$format('%s joins', person.nmae)$$, '''b''');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', 'contract.starts');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', 'string_agg(person.name, '','')');
SELECT identity_sync.add_notification('x', 'target_held', 'person.mail', '''s''', '''b''');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', '''b''', 'sms');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', '''b''', 'webhook');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', '''b''', options => '{"digest": "soon"}');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', '''b''', options => '{"smpt_url": "smtp://x"}');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', '''b''', options => '{"smtp_url": "smtps://u:pw@relay:465"}');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '''s''', '''b''', options => '{"target": "nope"}');
SELECT identity_sync.add_notification('x', 'target_held', '''ops@example.com''', '''s''', '''b''', options => '{"lead_time": "1 day"}');
SELECT identity_sync.add_notification('hire', 'create', '''ops@example.com''', '''s''', '''b''');
SELECT identity_sync.add_notification('x', 'create', '''ops@example.com''', '1); DROP TABLE staff; SELECT (1', '''b''');
SELECT identity_sync.drop_notification('nope');
SELECT count(*) AS rules FROM identity_sync.notification;

-- A hire: one notice to the head of sales, written by the plan. Rolled back, it leaves nothing.
INSERT INTO staff VALUES (3, 'Cid', 'cid@example.com');
INSERT INTO post VALUES (3, 'S', '2024-06-20', NULL);
BEGIN;
SELECT identity_sync._plan(100) AS planned;
SELECT count(*) AS notices FROM identity_sync.notice;
ROLLBACK;
SELECT count(*) AS notices FROM identity_sync.notice;
SELECT identity_sync._plan(100) AS planned;
SELECT target, persons, about, recipient, subject, body, state FROM identity_sync.notices ORDER BY id;

-- A hire into engineering, which has no head: the recipients are NULL, the message skipped.
INSERT INTO staff VALUES (4, 'Dee', 'dee@example.com');
INSERT INTO post VALUES (4, 'E', '2024-06-20', NULL);
SELECT identity_sync._plan(100) AS planned;
SELECT step, target, detail->>'notification' AS notification, detail->>'error' AS error
  FROM identity_sync.trace('4') WHERE step LIKE 'notice%';

-- Dry-run targets are told only when the rule says so: the two notices above are app's.
SELECT target, count(*) FROM identity_sync.notices GROUP BY 1 ORDER BY 1;
SELECT identity_sync.add_notification('dry hire', 'create', '''audit@example.com''', $$'dry: ' || person.name$$, '''b''',
    options => '{"target": "dry", "dry_run": true}');
INSERT INTO staff VALUES (5, 'Eve', NULL);
INSERT INTO post VALUES (5, 'S', '2024-06-20', NULL);
SELECT identity_sync._plan(100) AS planned;
SELECT notification, target, recipient, subject FROM identity_sync.notices WHERE persons @> '{5}' ORDER BY id;

-- A digest: an operator's notices of one rule are collected into one message per period.
SELECT identity_sync.add_notification('leavers', 'disable', '''hr@example.com''', $$person.name || ' left'$$,
    $$person.name || ' left on ' || to_char(today, 'YYYY-MM-DD')$$, options => '{"digest": "1 hour", "target": "app"}');
-- Ann and Cid leave: max_disables (1) holds app; the hold makes one notice to the operators,
-- whatever the number of held events, and the leavers' own notices wait for the release.
SELECT identity_sync.add_notification('held', 'target_held', '''ops@example.com, oncall@example.com''',
    $$'held: ' || (target->>'name')$$, $$format('%s %s events; %s allows %s', event->>'planned', event->>'kind', event->>'threshold', event->>'allowed')$$);
UPDATE post SET ends = '2024-06-19' WHERE staff_id IN (1, 3);
SELECT identity_sync._plan(100) AS planned;
SELECT notification, recipient, subject, body, items, state FROM identity_sync.notices WHERE notification IN ('held', 'leavers') ORDER BY id;
SELECT identity_sync.release('app');
SELECT notification, recipient, subject, body, items, state, due_at > now() AS collecting
  FROM identity_sync.notices WHERE notification IN ('held', 'leavers') ORDER BY id;

-- Released, the leavers' notices go at once (one message: they were planned together).
-- Without the threshold, Eve and then Dee leave in two plans: their notices are collected into
-- one message, due when the digest's hour is over.
SELECT identity_sync.alter_target('app', options => '{"max_disables": null}');
UPDATE post SET ends = '2024-06-19' WHERE staff_id = 5;
SELECT identity_sync._plan(100) AS planned;
UPDATE post SET ends = '2024-06-19' WHERE staff_id = 4;
SELECT identity_sync._plan(100) AS planned;
SELECT notification, recipient, subject, body, items, state, due_at > now() + interval '59 minutes' AS collecting
  FROM identity_sync.notices WHERE notification = 'leavers' ORDER BY id;

-- The worker's claim and record: sent; a transient failure retries with backoff; a permanent
-- one fails. The digest collecting is not due yet.
SELECT id, notification, channel, recipient, subject, items, attempt FROM identity_sync._claim_notices(10) ORDER BY id;
SELECT identity_sync._record_notices(ids, ARRAY[NULL, 'smtp: connection refused', 'invalid recipient address'], ARRAY[false, true, false])
  FROM (SELECT array_agg(id ORDER BY id) AS ids FROM identity_sync.notice WHERE state = 'sending') AS s;
SELECT notification, recipient, state, attempts, last_error, due_at > now() AS later
  FROM identity_sync.notices WHERE state IN ('sent', 'retry', 'failed') ORDER BY id;
SELECT target, notices_pending, notices_failed FROM identity_sync.status ORDER BY target;

-- Rule changes are in the audit log; dropping a rule drops its notices.
SELECT identity_sync.drop_notification('leavers');
SELECT action, object FROM identity_sync.audit_log WHERE action LIKE '%notification' ORDER BY at, object;
SELECT count(*) AS leaver_notices FROM identity_sync.notices WHERE notification = 'leavers';

-- Operators hear of a target whose planning fails (once per failure streak) and of one that the
-- circuit breaker quarantines.
SELECT identity_sync.add_notification('planning', 'plan_errors', '''ops@example.com''',
    $$'planning ' || (target->>'name') || ' fails'$$, $$event->>'error'$$);
SELECT identity_sync.add_notification('down', 'target_failing', '''ops@example.com''',
    $$(target->>'name') || ' is quarantined'$$, $$format('%s failures in a row: %s', event->>'failures', event->>'reason')$$);
SELECT identity_sync.map('dry', 'head', '(SELECT h.staff_id FROM head h WHERE h.dept = contract.dept)');
REVOKE SELECT ON head FROM identity_sync_evaluator;
UPDATE staff SET name = 'Robert' WHERE id = 2;
SELECT identity_sync._plan(100) AS planned;
UPDATE staff SET name = 'Bob' WHERE id = 2;
SELECT identity_sync._plan(100) AS planned;
GRANT SELECT ON head TO identity_sync_evaluator;
SELECT identity_sync.alter_target('app', options => '{"quarantine_after": "1 microsecond"}');
SELECT count(*) > 0 AS claimed FROM identity_sync._claim(ARRAY['webhook'], 10);
SELECT identity_sync._record_many(ARRAY(
    SELECT ROW(e.id, 'retry', NULL, '503 Service Unavailable', 503, 0)::identity_sync._outcome
      FROM identity_sync.event e WHERE e.state = 'sending'));
SELECT count(*) > 0 AS claimed FROM identity_sync._claim(ARRAY['webhook'], 10);
SELECT identity_sync._record_many(ARRAY(
    SELECT ROW(e.id, 'retry', NULL, '503 Service Unavailable', 503, 0)::identity_sync._outcome
      FROM identity_sync.event e WHERE e.state = 'sending'));
SELECT target, state FROM identity_sync.status ORDER BY target;
SELECT notification, on_event, target, recipient, subject, body FROM identity_sync.notices
 WHERE notification IN ('planning', 'down') ORDER BY id;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE staff, post, head;
