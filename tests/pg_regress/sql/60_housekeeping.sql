-- Housekeeping, as the worker runs it on every tick besides planning and delivering (called by
-- hand here: no worker serves the regression database): snapshots of sources that cannot carry
-- triggers, date boundaries, expiry of self-service grants, retention, and when to wake next.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
CREATE TABLE emp (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE emp_job (emp_id int NOT NULL, starts date NOT NULL, ends date);
-- A view cannot carry triggers: it is captured by comparing snapshots.
CREATE VIEW emp_public AS SELECT id, name FROM emp;
GRANT SELECT ON emp_public, emp_job TO identity_sync_evaluator;   -- user SQL runs as it (README, Security)
INSERT INTO emp VALUES (1, 'Ann'), (2, 'Bob'), (3, 'Cy');
INSERT INTO emp_job VALUES (1, '2020-01-01', NULL), (2, '2020-01-01', NULL), (3, '2020-01-01', '2024-06-25');
SELECT identity_sync.set_clock('2024-06-20 12:00+00');
SELECT identity_sync._check_boundaries();  -- the boundary check starts at the clock's day
SELECT identity_sync.add_person_source('emp_public', 'id');
SELECT identity_sync.add_contract_source('emp_job', 'emp_id', 'starts', 'ends');
SELECT identity_sync.add_target('feed', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true}');
SELECT identity_sync.map('feed', 'name', $$person.name$$);
SELECT identity_sync.add_rule('feed', 'everyone', 'true');
RESET client_min_messages;

SELECT relation, role, capture, snapshot_interval, snapshot_at FROM identity_sync.source ORDER BY id;
-- Nothing is due: the worker sleeps until the next day's boundaries at the latest.
SELECT identity_sync._next_due_ms() BETWEEN 0 AND 86400000 AS until_tomorrow_at_most;

-- The first tick takes the view's first snapshot: every person in it is a change.
SELECT identity_sync._housekeeping();
SELECT op, ARRAY(SELECT k FROM unnest(keys) AS k ORDER BY k) AS keys FROM identity_sync.change ORDER BY id;
SELECT identity_sync._next_due_ms() BETWEEN 50000 AND 60000 AS next_snapshot_within_a_minute;
SELECT identity_sync._plan(100);

-- A change behind the view is seen at the next snapshot (snapshot_interval), not before.
UPDATE emp SET name = 'Bea' WHERE id = 2;
SELECT identity_sync._housekeeping();
SELECT count(*) AS changes_before_the_interval FROM identity_sync.change;
UPDATE identity_sync.source SET snapshot_at = snapshot_at - interval '1 minute' WHERE capture = 'snapshot';  -- time passes
SELECT identity_sync._housekeeping();
SELECT op, keys FROM identity_sync.change ORDER BY id;
SELECT identity_sync._plan(100);

-- Days pass without any DML: the tick finds the contracts that ended meanwhile.
SELECT identity_sync.set_clock('2024-06-27 08:00+00');
SELECT identity_sync._housekeeping();
SELECT op, keys FROM identity_sync.change ORDER BY id;
SELECT identity_sync._plan(100);
SELECT person_key, state FROM identity_sync.accounts ORDER BY person_key;

-- Self-service grants past their validity expire (the planner then revokes their groups).
INSERT INTO identity_sync.product (name, target_id, groups, owners, valid_for)
SELECT 'vpn', id, '{vpn}', 'false', interval '1 day' FROM identity_sync.target WHERE name = 'feed';
INSERT INTO identity_sync.request (product_id, person_key, requested_by, state, requested_at, decided_at, expires_at)
SELECT id, '1', 'emp_1', 'approved', identity_sync._now() - interval '2 days', identity_sync._now() - interval '25 hours',
       identity_sync._now() - interval '1 hour'
  FROM identity_sync.product WHERE name = 'vpn';
SELECT identity_sync._housekeeping();
SELECT person_key, state, ended_at = expires_at AS ended_when_it_expired, ended_by FROM identity_sync.request;
SELECT op, keys FROM identity_sync.change ORDER BY id;
SELECT action, object, new->>'state' AS state FROM identity_sync.audit_log WHERE action = 'expire';
SELECT identity_sync._plan(100);

-- Retention (identity_sync.event_retention): delivered events older than it are removed, and
-- plan runs older than it once none of their events is left (the undelivered events here keep
-- the oldest plan run, their cause); threshold counts older than their hour too.
UPDATE identity_sync.event SET done_at = now() - identity_sync._event_retention() - interval '1 minute'
 WHERE person_key = '1';
UPDATE identity_sync.plan_run SET started_at = now() - identity_sync._event_retention() - interval '1 minute'
 WHERE id = (SELECT min(id) FROM identity_sync.plan_run);
UPDATE identity_sync._plan_count SET at = now() - interval '2 hours';
SELECT (SELECT count(*) FROM identity_sync.event) AS events, (SELECT count(*) FROM identity_sync.plan_run) AS plan_runs,
       (SELECT count(*) FROM identity_sync._plan_count) AS plan_counts;
SELECT identity_sync._housekeeping();
SELECT (SELECT count(*) FROM identity_sync.event) AS events, (SELECT count(*) FROM identity_sync.plan_run) AS plan_runs,
       (SELECT count(*) FROM identity_sync._plan_count) AS plan_counts;
SELECT DISTINCT person_key FROM identity_sync.events ORDER BY 1;

-- A retry that is due soon wakes the worker in time, unless its target is paused.
UPDATE identity_sync.event SET state = 'retry', due_at = now() + interval '5 seconds'
 WHERE id = (SELECT max(id) FROM identity_sync.event);
SELECT identity_sync._next_due_ms() BETWEEN 0 AND 5000 AS retry_within_five_seconds;
SELECT identity_sync.pause('feed');
SELECT identity_sync._next_due_ms() > 5000 AS paused_target_ignored;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP VIEW emp_public;
DROP TABLE emp, emp_job;
