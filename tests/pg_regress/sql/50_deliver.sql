-- Delivery, SQL side, as the worker drives it (called by hand here: no worker serves the
-- regression database): claiming due events, recording outcomes in the registry, and table
-- targets, which SQL writes itself, with core's retry classification and backoff.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
CREATE TABLE staff (id int PRIMARY KEY, given text NOT NULL, dept text NOT NULL);
INSERT INTO staff VALUES (1, 'Ann', 'S'), (2, 'Bob', 'E'), (3, 'Cy', 'S');
GRANT SELECT ON staff TO identity_sync_evaluator;   -- user SQL runs as it (README, Security)
-- The application's own table: it knows two departments, and while it is being migrated it
-- refuses writes with a transient SQLSTATE (lock_not_available).
CREATE TABLE app_user (person_key text PRIMARY KEY, login text NOT NULL, dept text CHECK (dept IN ('S', 'E')),
                       active boolean NOT NULL DEFAULT true);
CREATE TABLE app_migrating (since timestamptz);
CREATE FUNCTION app_guard() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
    IF EXISTS (SELECT FROM app_migrating) THEN
        RAISE EXCEPTION 'app_user is being migrated' USING ERRCODE = 'lock_not_available';
    END IF;
    RETURN coalesce(NEW, OLD);
END
$$;
CREATE TRIGGER guard BEFORE INSERT OR UPDATE OR DELETE ON app_user FOR EACH ROW EXECUTE FUNCTION app_guard();
SELECT identity_sync.add_person_source('staff', 'id');
SELECT identity_sync.add_target('app', 'table', NULL, '{"relation": "app_user", "key_column": "person_key", "active_column": "active"}');
SELECT identity_sync.map('app', 'login', $$lower(person.given)$$);
SELECT identity_sync.map('app', 'dept', $$person.dept$$);
SELECT identity_sync.add_rule('app', 'everyone', 'true');
SELECT identity_sync.add_target('crm', 'scim', 'http://127.0.0.1:9/scim/v2');
SELECT identity_sync.map('crm', 'userName', $$lower(person.given) || CASE WHEN iteration > 0 THEN iteration::text ELSE '' END$$,
                         is_unique => true);
SELECT identity_sync.add_rule('crm', 'everyone', 'true', '{staff}');
SELECT identity_sync.resync('app'), identity_sync.resync('crm');
SELECT identity_sync._plan(100);
RESET client_min_messages;
-- CONTEXT lines name our functions' line numbers; DETAIL and HINT are the contract.
\set SHOW_CONTEXT never

-- The retry policy is core's (identity_sync_core::retry), the one HTTP targets use: which
-- SQLSTATEs are worth another try, and the backoff (full jitter below a ceiling of 0.5 s doubling
-- per attempt up to 5 minutes; a target's Retry-After is the least delay; never over an hour).
SELECT code, identity_sync._is_transient_sqlstate(code) AS transient
  FROM unnest(ARRAY['08006', '40001', '40P01', '53100', '57P01', '55P03',
                    '23505', '23514', '22P02', '42703', '55000']) AS code;
SELECT n, identity_sync._retry_delay(n) BETWEEN interval '0' AND least(interval '0.5 s' * 2 ^ (n - 1), interval '5 min')
          AS within_the_ceiling
  FROM generate_series(1, 12) AS n;
SELECT identity_sync._retry_delay(1, '10 seconds') AS retry_after_wins,
       identity_sync._retry_delay(3, '2 hours') AS at_most_an_hour;

-- A table target is written by SQL in the worker's own transaction: what is due goes out now.
SELECT identity_sync._deliver_tables(100);
SELECT * FROM app_user ORDER BY person_key;
SELECT person_key, kind, state, attempts, last_error FROM identity_sync.events WHERE target = 'app' ORDER BY person_key, seq;
SELECT person_key, remote_id, state, attributes FROM identity_sync.accounts WHERE target = 'app' ORDER BY person_key;

-- A transient error (the application is being migrated) is retried with the backoff: the
-- event waits less than its first ceiling, then goes out when it is due again.
UPDATE staff SET dept = 'E' WHERE id = 1;
SELECT identity_sync._plan(100);
INSERT INTO app_migrating VALUES (now());
SELECT identity_sync._deliver_tables(100);
SELECT person_key, kind, state, attempts, last_error,
       due_at >= sent_at AND due_at <= sent_at + interval '1 second' AS due_within_the_first_ceiling
  FROM identity_sync.events WHERE target = 'app' AND kind = 'update';
DELETE FROM app_migrating;
UPDATE identity_sync.event SET due_at = now() WHERE state = 'retry';   -- time passes
SELECT identity_sync._deliver_tables(100);
SELECT person_key, kind, state, attempts, last_error FROM identity_sync.events WHERE target = 'app' AND kind = 'update';
SELECT * FROM app_user WHERE person_key = '1';

-- A permanent error (a department the application does not know) fails the event at once, and
-- the person's later events wait behind it; other persons go on.
UPDATE staff SET dept = 'Q' WHERE id = 2;
SELECT identity_sync._plan(100);
SELECT identity_sync._deliver_tables(100);
UPDATE staff SET dept = 'S' WHERE id = 2;
UPDATE staff SET dept = 'E' WHERE id = 3;
SELECT identity_sync._plan(100);
SELECT identity_sync._deliver_tables(100);
SELECT person_key, seq, kind, state, attempts, last_error FROM identity_sync.events
 WHERE target = 'app' AND person_key IN ('2', '3') ORDER BY person_key, seq;

-- Transient errors end after identity_sync.max_attempts attempts: the event fails, saying so.
UPDATE staff SET dept = 'S' WHERE id = 3;
SELECT identity_sync._plan(100);
UPDATE identity_sync.event SET attempts = identity_sync._max_attempts() - 1   -- as if tried before
 WHERE state = 'pending' AND person_key = '3' AND target_id = (SELECT id FROM identity_sync.target WHERE name = 'app');
INSERT INTO app_migrating VALUES (now());
SELECT identity_sync._deliver_tables(100);
DELETE FROM app_migrating;
SELECT person_key, kind, state, attempts = identity_sync._max_attempts() AS used_every_attempt,
       regexp_replace(last_error, '\d+', 'N') AS last_error
  FROM identity_sync.events WHERE target = 'app' AND person_key = '3' AND state = 'failed';

-- HTTP targets: the worker claims due events (per person only the first unfinished one, so a
-- person's events go out in order), sends them outside any transaction, and records the
-- outcomes of a round at once.
SELECT person_key, kind, payload, remote_id, attempts FROM identity_sync._claim(ARRAY['scim', 'webhook'], 10)
 ORDER BY person_key;
SELECT person_key, seq, kind, state FROM identity_sync.events WHERE target = 'crm' ORDER BY person_key, seq;
SELECT identity_sync._record_many(ARRAY(
    SELECT ROW(e.id, o.outcome, o.remote_id, o.error, o.http_status, o.retry_in_ms)::identity_sync._outcome
      FROM identity_sync.events e
      JOIN (VALUES ('1', 'done', 'u-1', NULL, 201, NULL),
                   ('2', 'retry', NULL, '503 Service Unavailable', 503, 60000),
                   ('3', 'failed', NULL, '400 Bad Request: invalid userName', 400, NULL))
           AS o(person_key, outcome, remote_id, error, http_status, retry_in_ms) ON o.person_key = e.person_key
     WHERE e.target = 'crm' AND e.state = 'sending'));
SELECT person_key, kind, state, attempts, http_status, last_error,
       CASE WHEN state = 'retry' THEN due_at - now() BETWEEN interval '59 s' AND interval '60 s' END AS retry_in_a_minute
  FROM identity_sync.events WHERE target = 'crm' AND seq = 1 ORDER BY person_key;
SELECT person_key, remote_id, state, planned_state, attributes, groups, planned_groups
  FROM identity_sync.accounts WHERE target = 'crm' ORDER BY person_key;

-- An outcome for an event no longer in flight (an operator skipped it meanwhile) changes nothing.
SELECT identity_sync._record(id, 'done', 'u-2') FROM identity_sync.events WHERE target = 'crm' AND person_key = '2' AND seq = 1;
SELECT person_key, state, remote_id FROM identity_sync.accounts WHERE target = 'crm' AND person_key = '2';

-- The target says the unique userName is taken by an account we do not manage: the value is
-- remembered as taken, the person's unfinished events are closed as done (with the reason) and
-- the person is planned again, with the next iteration.
UPDATE identity_sync.event SET due_at = now() WHERE state = 'retry';
SELECT person_key, kind, attempts FROM identity_sync._claim(ARRAY['scim'], 10) ORDER BY person_key;
SELECT identity_sync._record(id, 'conflict', error => '409 uniqueness: userName bob is taken')
  FROM identity_sync.events WHERE target = 'crm' AND person_key = '2' AND state = 'sending';
SELECT attribute, value, person_key FROM identity_sync._unique ORDER BY value;
SELECT person_key, op FROM identity_sync.pending_changes;
SELECT identity_sync._plan(100);
SELECT person_key, seq, kind, state, payload->'attributes' AS attributes FROM identity_sync.events
 WHERE target = 'crm' AND person_key = '2' ORDER BY seq;

-- Events in flight when the worker stopped are due again when it starts (at least once).
SELECT person_key, kind FROM identity_sync._claim(ARRAY['scim'], 10) ORDER BY person_key;
SELECT identity_sync._worker_start();
SELECT person_key, kind, state, last_error FROM identity_sync.events
 WHERE last_error = 'in flight when the worker stopped' ORDER BY person_key;

-- A paused target is not claimed.
SELECT identity_sync.pause('crm');
UPDATE identity_sync.event SET due_at = now() WHERE state = 'retry';
SELECT count(*) AS claimed_while_paused FROM identity_sync._claim(ARRAY['scim'], 10);

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP TABLE staff, app_user, app_migrating;
DROP FUNCTION app_guard();
