-- Status and operations as an operator sees them: the status view through a threshold hold and
-- failed deliveries, and the levers (release, discard, pause, resume, retry, skip, wait_idle)
-- with the errors they give. Delivery outcomes are recorded by hand here (no worker serves the
-- regression database), the way the worker records them.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
CREATE TABLE member (id int PRIMARY KEY, nick text NOT NULL);
INSERT INTO member VALUES (1, 'ann'), (2, 'bob'), (3, 'cy');
GRANT SELECT ON member TO identity_sync_evaluator;   -- user SQL runs as it (README, Security)
SELECT identity_sync.add_person_source('member', 'id');
SELECT identity_sync.add_target('crm', 'scim', 'http://127.0.0.1:9/scim/v2', '{"max_creates": 2}');
SELECT identity_sync.map('crm', 'userName', $$person.nick$$);
SELECT identity_sync.add_rule('crm', 'everyone', 'true', '{staff}');
SELECT identity_sync.add_target('hook', 'webhook', 'http://127.0.0.1:9/hook');
SELECT identity_sync.map('hook', 'nick', $$person.nick$$);
SELECT identity_sync.add_rule('hook', 'everyone', 'true');
RESET client_min_messages;
-- CONTEXT lines name our functions' line numbers; DETAIL and HINT are the contract.
\set SHOW_CONTEXT never

SELECT target, kind, state, held_by, accounts_active, accounts_pending, events_pending, events_held, dry_run
  FROM identity_sync.status ORDER BY target;

-- The initial sync plans 3 creates in crm, beyond max_creates: the whole target is held.
SELECT identity_sync.resync('crm'), identity_sync.resync('hook');
SELECT identity_sync._plan(100);
SELECT target, state, held_by, held_detail, accounts_pending, events_pending, events_held
  FROM identity_sync.status ORDER BY target;

-- Only a held target can be released or discarded.
SELECT identity_sync.release('nope');
SELECT identity_sync.release('hook');
SELECT identity_sync.discard('hook');

-- Discard drops the held events (and the accounts they would have made); the persons are
-- planned again on their next change or resync, and the threshold judges that plan afresh.
SELECT identity_sync.discard('crm');
SELECT target, state, held_by, accounts_pending, events_pending, events_held FROM identity_sync.status WHERE target = 'crm';
SELECT identity_sync.resync('crm');
SELECT identity_sync._plan(100);
SELECT target, state, held_detail, events_held FROM identity_sync.status WHERE target = 'crm';
-- Release lets them go out.
SELECT identity_sync.release('crm');
SELECT target, state, held_by, events_pending, events_held FROM identity_sync.status WHERE target = 'crm';

-- Pause stops delivery (nothing is claimed), resume restarts it.
SELECT identity_sync.pause('crm');
SELECT target, state FROM identity_sync.status WHERE target = 'crm';
SELECT count(*) AS claimed_while_paused FROM identity_sync._claim(ARRAY['scim'], 10);
SELECT identity_sync.resume('crm');

-- One round of deliveries: Ann's create succeeds, Bob's is refused, Cy's meets a 503.
SELECT person_key, kind FROM identity_sync._claim(ARRAY['scim'], 10) ORDER BY person_key;
SELECT identity_sync._record_many(ARRAY(
    SELECT ROW(e.id, o.outcome, o.remote_id, o.error, o.http_status, o.retry_in_ms)::identity_sync._outcome
      FROM identity_sync.events e
      JOIN (VALUES ('1', 'done', 'u-1', NULL, 201, NULL),
                   ('2', 'failed', NULL, '400 Bad Request: userName bob is reserved', 400, NULL),
                   ('3', 'retry', NULL, '503 Service Unavailable', 503, 1000))
           AS o(person_key, outcome, remote_id, error, http_status, retry_in_ms) ON o.person_key = e.person_key
     WHERE e.target = 'crm' AND e.state = 'sending'));
SELECT target, state, accounts_active, accounts_pending, events_pending, events_retrying, events_failed,
       last_success IS NOT NULL AS has_succeeded, last_error IS NOT NULL AS has_an_error, delivered_last_hour
  FROM identity_sync.status WHERE target = 'crm';
SELECT person_key, seq, kind, state, attempts, http_status, last_error FROM identity_sync.events
 WHERE target = 'crm' ORDER BY person_key, seq;

-- Retry: one event by id, or every failed and retrying event of a target by name.
SELECT identity_sync.retry('999');
SELECT identity_sync.retry('nope');
SELECT identity_sync.retry(id::text) FROM identity_sync.events WHERE target = 'crm' AND state = 'failed';
SELECT identity_sync.retry('crm');
SELECT person_key, kind, state, attempts FROM identity_sync.events WHERE target = 'crm' AND seq = 1 ORDER BY person_key;

-- Skip gives up on an event so that the person's later events go on; a skipped create takes
-- the person's later events with it, and the next plan creates the account again.
SELECT identity_sync.skip(999999);
SELECT identity_sync.skip(id) FROM identity_sync.events WHERE target = 'crm' AND person_key = '1' AND kind = 'create';
SELECT person_key, kind FROM identity_sync._claim(ARRAY['scim'], 10) ORDER BY person_key;
SELECT identity_sync._record(id, 'failed', error => '400 Bad Request: userName bob is reserved', http_status => 400)
  FROM identity_sync.events WHERE target = 'crm' AND person_key = '2' AND state = 'sending';
SELECT identity_sync.skip(id) FROM identity_sync.events WHERE target = 'crm' AND person_key = '2' AND kind = 'create';
SELECT seq, kind, state, regexp_replace(last_error, '(skipped by |event )[^)]*', '\1…') AS last_error
  FROM identity_sync.events WHERE target = 'crm' AND person_key = '2' ORDER BY seq;
SELECT person_key, state, planned_state FROM identity_sync.accounts WHERE target = 'crm' AND person_key = '2';
UPDATE member SET nick = 'bobby' WHERE id = 2;
SELECT identity_sync._plan(100);
SELECT seq, kind, state, payload->'attributes' AS attributes FROM identity_sync.events
 WHERE target = 'crm' AND person_key = '2' AND state <> 'done' ORDER BY seq;

-- wait_idle: nothing is idle while events wait for a worker; paused targets do not count.
SELECT identity_sync.wait_idle('50 ms');
SELECT identity_sync.pause('crm'), identity_sync.pause('hook');
SELECT identity_sync.wait_idle('1 second');

SELECT action, object, new FROM identity_sync.audit_log
 WHERE action IN ('release', 'discard', 'pause', 'resume', 'retry', 'skip') ORDER BY id;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE member;
