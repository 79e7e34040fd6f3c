-- Planning as a user sees it: preview, then the planner (called by hand here: no worker serves
-- the regression database), the registry, events, status and a trace.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
CREATE TABLE person (id int PRIMARY KEY, given text NOT NULL, family text NOT NULL);
CREATE TABLE job (person_id int NOT NULL, dept text NOT NULL, starts date NOT NULL, ends date);
GRANT SELECT ON person, job TO identity_sync_evaluator;
INSERT INTO person VALUES (1, 'Ann', 'Lee'), (2, 'Bob', 'Lee'), (3, 'Ann', 'Lee'), (4, 'Cy', 'Future');
INSERT INTO job VALUES (1, 'S', '2020-01-01', NULL), (2, 'E', '2020-01-01', '2024-06-18'),
                       (3, 'S', '2022-01-01', NULL), (4, 'S', '2024-07-04', NULL);
SELECT identity_sync.set_clock('2024-06-20 12:00+00');
SELECT identity_sync._check_boundaries();  -- the worker does this on every tick
SELECT identity_sync.add_person_source('person', 'id');
SELECT identity_sync.add_contract_source('job', 'person_id', 'starts', 'ends');
SELECT identity_sync.add_target('dir', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true, "create_before": "30 days"}');
SELECT identity_sync.map('dir', 'login', $$lower(person.given || '.' || person.family) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$, true, true);
SELECT identity_sync.map('dir', 'dept', $$contract.dept$$);
SELECT identity_sync.add_rule('dir', 'everyone', 'true', '{staff}');
SELECT identity_sync.add_rule('dir', 'sales', $$contract.dept = 'S'$$, '{sales}');
RESET client_min_messages;
-- CONTEXT lines name our functions' line numbers; DETAIL and HINT are the contract.
\set SHOW_CONTEXT never

-- What would happen to Ann (1) and to Cy (4, starts in two weeks: pre-boarding)?
SELECT target, in_scope, matched_rules, attributes, groups, account, jsonb_pretty(events) AS events
  FROM identity_sync.preview('1', 'dir');
SELECT target, in_scope, attributes->>'login' AS login, events->0->'payload'->'active' AS created_active
  FROM identity_sync.preview('4', 'dir');

-- Plan everybody (resync marks all persons dirty; _plan is what the worker runs). Bob (2)
-- left two days ago: a first sync creates no account for him.
SELECT identity_sync.resync('dir');
SELECT identity_sync._plan(100);
SELECT person_key, state, attributes, groups FROM identity_sync.accounts WHERE target = 'dir' ORDER BY person_key;
SELECT person_key, seq, kind, state, payload FROM identity_sync.events WHERE target = 'dir' ORDER BY person_key, seq;

-- Ann moves to engineering; Bob's salary changes (not mapped: nothing to do).
UPDATE job SET dept = 'E' WHERE person_id = 1;
SELECT person_key, op FROM identity_sync.pending_changes ORDER BY 1;
SELECT identity_sync._plan(100);
SELECT person_key, seq, kind, payload FROM identity_sync.events WHERE target = 'dir' AND seq > 2 ORDER BY person_key, seq;

-- Cy's first day comes: the boundary check enables the pre-boarded account.
SELECT identity_sync.set_clock('2024-07-04 08:00+00');
SELECT identity_sync._check_boundaries();
SELECT identity_sync._plan(100);
SELECT person_key, kind FROM identity_sync.events WHERE target = 'dir' AND person_key = '4' ORDER BY seq;

SELECT target, kind, state, accounts_active, accounts_disabled, events_pending, events_failed, dry_run
  FROM identity_sync.status ORDER BY target;

-- Operators pause and resume delivery; both are in the audit log.
SELECT identity_sync.pause('dir');
SELECT target, state FROM identity_sync.status;
SELECT identity_sync.resume('dir');
SELECT target, state FROM identity_sync.status;
SELECT identity_sync.pause('nope');
SELECT action, object FROM identity_sync.audit_log WHERE action IN ('pause', 'resume') ORDER BY id;
SELECT step, target, detail->>'state' AS state FROM identity_sync.trace('4') WHERE step <> 'plan' ORDER BY at, step;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE person, job;
