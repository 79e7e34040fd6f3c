-- Notifications: rules that tell managers, approvers and operators what happened, by mail or by
-- a chat webhook. A rule's recipients, subject and body are SQL, checked when configured like
-- mappings and evaluated as identity_sync.run_as, read-only (src/evaluate.rs). The notices are
-- written into the outbox identity_sync.notice in the transaction that caused them (a plan, a
-- request, a decision, a hold), so a rolled-back plan sends nothing and a committed one is
-- never lost; the worker sends them (src/deliver/notify.rs, core/src/notify.rs) with retries.
--
-- Where notices are made: _plan_target (account events; target_held), release (account events
-- of released holds), request_access / approve / deny (request_pending, request_decided),
-- _housekeeping (grant_expiring), _breaker (target_quarantined), _plan_failed (plan_errors).

-- The events a rule can be on: name, whether it is about a person (then the names person,
-- contract, contracts are bound), and what it means.
CREATE FUNCTION identity_sync._notification_events()
RETURNS TABLE (name text, about_person boolean, meaning text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('create', true, 'an account was planned to be created (per target, or all)'),
           ('update', true, 'an account''s attributes were planned to change'),
           ('enable', true, 'an account was planned to be enabled'),
           ('disable', true, 'an account was planned to be disabled'),
           ('delete', true, 'an account was planned to be deleted'),
           ('request_pending', true, 'a self-service request waits for its owners (person: the requester)'),
           ('request_decided', true, 'a self-service request was approved or denied (person: the requester)'),
           ('grant_expiring', true, 'an approved grant expires within the option lead_time (default 7 days)'),
           ('target_held', false, 'a threshold held a target (one notice per hold)'),
           ('target_quarantined', false, 'a target whose every request failed was quarantined (alias target_failing)'),
           ('plan_errors', false, 'planning a target failed (the first failure of a streak)')
$$;

-- Options of a rule: name, channels, type, meaning (declared once, validated by
-- _validate_notification_options).
CREATE FUNCTION identity_sync._notification_options()
RETURNS TABLE (name text, channels text[], type text, meaning text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('target', '{mail,webhook}'::text[], 'text', 'only events of this target (account events, holds, quarantines, plan errors, requests for its products)'),
           ('digest', '{mail,webhook}', 'interval', 'collect a recipient''s notices of this rule into one message per period'),
           ('dry_run', '{mail,webhook}', 'boolean', 'also notify account events of dry-run targets (default false)'),
           ('lead_time', '{mail,webhook}', 'interval', 'grant_expiring: how long before the expiry (default 7 days)'),
           ('smtp_url', '{mail}', 'text', 'the SMTP relay: smtp://host:port (loopback only), smtp://host:587?tls=required (STARTTLS), smtps://host:465 (implicit TLS); default identity_sync.smtp_url'),
           ('from', '{mail}', 'text', 'the From address; default identity_sync.smtp_from'),
           ('url', '{webhook}', 'text', 'the incoming webhook (Slack, Teams) to POST to'),
           ('secret_file', '{mail,webhook}', 'text', 'mail: the SMTP password (the user is the one in smtp_url); webhook: a whsec_ signing key'),
           ('timeout', '{mail,webhook}', 'interval', 'per message, default 10 s'),
           ('max_concurrency', '{mail,webhook}', 'integer', 'messages in flight for this relay or webhook, default 4')
$$;

-- Check a rule's options for its channel and event; returns them.
CREATE FUNCTION identity_sync._validate_notification_options(channel text, on_event text, options jsonb)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o record;
    d record;
BEGIN
    IF options IS NULL OR jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'notification options must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('options is %s.', coalesce(options::text, 'NULL'));
    END IF;
    FOR o IN SELECT e.key, e.value, d2.channels, d2.type FROM jsonb_each(options) AS e
               LEFT JOIN identity_sync._notification_options() AS d2 ON d2.name = e.key LOOP
        IF o.type IS NULL OR NOT channel = ANY (o.channels) THEN
            RAISE EXCEPTION 'unknown option "%" for a % notification', o.key, channel USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Valid options: ' || (SELECT string_agg(x.name, ', ' ORDER BY x.name)
                                              FROM identity_sync._notification_options() x WHERE channel = ANY (x.channels)) || '.';
        END IF;
        BEGIN
            CASE o.type
                WHEN 'interval' THEN
                    IF jsonb_typeof(o.value) <> 'string' OR (o.value->>0)::interval <= interval '0' THEN
                        RAISE EXCEPTION 'not a positive interval';
                    END IF;
                WHEN 'boolean' THEN
                    IF jsonb_typeof(o.value) <> 'boolean' THEN
                        RAISE EXCEPTION 'not a boolean';
                    END IF;
                WHEN 'integer' THEN
                    IF jsonb_typeof(o.value) <> 'number' OR (o.value->>0)::numeric <> trunc((o.value->>0)::numeric)
                       OR (o.value->>0)::numeric < 1 THEN
                        RAISE EXCEPTION 'not a whole number of 1 or more';
                    END IF;
                ELSE
                    IF jsonb_typeof(o.value) <> 'string' OR btrim(o.value->>0) = '' THEN
                        RAISE EXCEPTION 'not a non-empty string';
                    END IF;
            END CASE;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid value for notification option "%": %', o.key, o.value USING ERRCODE = 'invalid_parameter_value',
                DETAIL = format('It must be %s.', CASE o.type WHEN 'interval' THEN 'a positive interval such as ''1 hour'''
                                                             WHEN 'boolean' THEN 'true or false'
                                                             WHEN 'integer' THEN 'a whole number of 1 or more'
                                                             ELSE 'a non-empty string' END);
        END;
    END LOOP;
    IF options ? 'lead_time' AND on_event <> 'grant_expiring' THEN
        RAISE EXCEPTION 'option "lead_time" is for grant_expiring notifications only' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'dry_run' AND on_event NOT IN ('create', 'update', 'enable', 'disable', 'delete') THEN
        RAISE EXCEPTION 'option "dry_run" is for account events only' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Account events: create, update, enable, disable, delete.';
    END IF;
    IF channel = 'webhook' AND NOT options ? 'url' THEN
        RAISE EXCEPTION 'a webhook notification needs the option "url"' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The incoming webhook of the chat channel, e.g. {"url": "https://hooks.slack.com/services/..."}.';
    END IF;
    IF options ? 'url' AND options->>'url' !~* '^https?://' THEN
        RAISE EXCEPTION 'option "url" must be an http or https URL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'smtp_url' AND options->>'smtp_url' !~* '^smtps?://[^/?#]+' THEN
        RAISE EXCEPTION 'option "smtp_url" must be an smtp:// or smtps:// URL' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'e.g. smtps://relay.example:465 or smtp://relay.example:587?tls=required; the password goes in secret_file.';
    END IF;
    IF options ? 'smtp_url' AND options->>'smtp_url' ~ '^[^:]+://[^/@]*:[^/@]*@' THEN
        RAISE EXCEPTION 'option "smtp_url" must not hold a password' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Put the user in the URL (smtps://user@relay.example) and the password in a file named by secret_file.';
    END IF;
    IF options ? 'secret_file' AND options->>'secret_file' !~ '^/' THEN
        RAISE EXCEPTION 'option "secret_file" must be an absolute path' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN options;
END
$$;

-- The FROM clause of a rule's query: for events about a person, the person document
-- (_from_clause: person, contract, contracts, today) of the persons in $1 joined with their
-- contexts; otherwise today alone. The contexts ($4, one JSON object each: person_key, event,
-- account, request, target) give the names event, account, request and target (jsonb), and
-- _ord, the context's position.
CREATE FUNCTION identity_sync._notice_from(on_event text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ctx constant text := 'CROSS JOIN LATERAL (SELECT _v.o AS _ord, _v.x->''event'' AS event, _v.x->''account'' AS account, '
                         '_v.x->''request'' AS request, _v.x->''target'' AS target '
                         'FROM (SELECT _u.t::jsonb AS x, _u.o FROM unnest($4::text[]) WITH ORDINALITY AS _u(t, o)) AS _v %s) AS _ctx ';
    f text;
    w text;
BEGIN
    IF NOT (SELECT e.about_person FROM identity_sync._notification_events() e WHERE e.name = on_event) THEN
        RETURN 'FROM (SELECT $2::date AS today, $3::int AS _it, $1::text[] AS _keys) AS _p ' || format(ctx, '');
    END IF;
    f := identity_sync._from_clause();
    w := 'WHERE ' || identity_sync._person_key_in('person', 1);
    IF right(f, length(w)) <> w THEN
        RAISE EXCEPTION 'internal error: the person document does not end with its key condition' USING ERRCODE = 'internal_error';
    END IF;
    RETURN left(f, length(f) - length(w))
        || format(ctx, 'WHERE _v.x->>''person_key'' = ' || identity_sync._person_key_expr()) || w;
END
$$;

-- Check one expression of a rule (`what`: recipients, subject, body) as identity_sync.run_as,
-- with the position of any error; returns its type.
CREATE FUNCTION identity_sync._check_notice_expression(on_event text, expr text, what text)
RETURNS regtype LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f text := identity_sync._notice_from(on_event);
BEGIN
    PERFORM identity_sync._check_user_text(what, expr);
    RETURN identity_sync._probe_user_expression(what, expr, f, CASE WHEN (SELECT e.about_person FROM identity_sync._notification_events() e
                                                                          WHERE e.name = on_event) THEN ' AND' ELSE ' WHERE' END);
END
$$;

-- A rule's query: one _notice_row per context (ordinal, recipients as jsonb, subject, body).
CREATE TYPE identity_sync._notice_row AS (ord bigint, recipients jsonb, subject text, body text);

CREATE FUNCTION identity_sync._notice_query(n identity_sync.notification) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('SELECT coalesce(array_agg(ROW(_ctx._ord, to_jsonb((%s%s)), (%s%s)::text, (%s%s)::text)::identity_sync._notice_row), ''{}'') %s',
                  n.recipients, E'\n', n.subject, E'\n', n.body, E'\n', identity_sync._notice_from(n.on_event))
$$;

CREATE FUNCTION identity_sync._notification(name text) RETURNS identity_sync.notification
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._by_name(NULL::identity_sync.notification, identity_sync._not_null(name, 'the notification name'),
                                  'Create one with identity_sync.add_notification().')
$$;

CREATE FUNCTION identity_sync.add_notification(name text, on_event text, recipients text, subject text, body text,
                                               channel text DEFAULT 'mail', options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    typ regtype;
    ev text := lower(btrim(on_event));
BEGIN
    PERFORM identity_sync._check_name('notification', name, EXISTS (SELECT FROM identity_sync.notification x WHERE x.name = add_notification.name),
                                      'Drop it first with identity_sync.drop_notification().');
    IF ev = 'target_failing' THEN
        ev := 'target_quarantined';
    END IF;
    IF ev IS NULL OR NOT EXISTS (SELECT FROM identity_sync._notification_events() e WHERE e.name = ev) THEN
        RAISE EXCEPTION 'unknown notification event "%"', on_event USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Events: ' || (SELECT string_agg(e.name, ', ') FROM identity_sync._notification_events() e) || ', target_failing.';
    END IF;
    IF channel IS NULL OR channel NOT IN ('mail', 'webhook') THEN
        RAISE EXCEPTION 'unknown notification channel "%"', channel USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Channels: mail, webhook.';
    END IF;
    options := identity_sync._validate_notification_options(channel, ev, options);
    n.name := name;
    n.on_event := ev;
    n.channel := channel;
    n.options := options - 'target';
    IF options ? 'target' THEN
        n.target_id := (identity_sync._target(options->>'target')).id;
    END IF;
    typ := identity_sync._check_notice_expression(ev, recipients, 'recipients expression');
    IF typ NOT IN ('unknown'::regtype, 'text'::regtype, 'character varying'::regtype, 'text[]'::regtype, 'character varying[]'::regtype) THEN
        RAISE EXCEPTION 'recipients expression must be text or text[], not %', typ USING ERRCODE = 'datatype_mismatch',
            DETAIL = recipients,
            HINT = 'Give an address (person.email), an array of them (ARRAY[''ops@example.com'', ''oncall@example.com'']), or NULL to skip.';
    END IF;
    -- (typed: a bare literal such as 'ops@example.com' is text in a select list, but not inside
    -- the to_jsonb() of the rule's query)
    n.recipients := format(CASE WHEN typ IN ('text[]'::regtype, 'character varying[]'::regtype) THEN '(%s)::text[]'
                                ELSE '(%s)::text' END, recipients || E'\n');
    FOREACH typ IN ARRAY ARRAY[identity_sync._check_notice_expression(ev, subject, 'subject expression'),
                               identity_sync._check_notice_expression(ev, body, 'body expression')] LOOP
        IF typ NOT IN ('text'::regtype, 'character varying'::regtype, 'unknown'::regtype) THEN
            RAISE EXCEPTION 'subject and body expressions must be text, not %', typ USING ERRCODE = 'datatype_mismatch',
                HINT = 'Format values as text, e.g. format(''%s left'', person.last_name) or to_char(today, ''YYYY-MM-DD'').';
        END IF;
    END LOOP;
    n.subject := subject;
    n.body := body;
    INSERT INTO identity_sync.notification (name, on_event, target_id, recipients, subject, body, channel, options)
    VALUES (n.name, n.on_event, n.target_id, n.recipients, n.subject, n.body, n.channel, n.options)
    RETURNING * INTO n;
    PERFORM identity_sync._audit('add_notification', name, NULL, to_jsonb(n));
END
$$;

CREATE FUNCTION identity_sync.drop_notification(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification := identity_sync._notification(name);
BEGIN
    -- (its notices go with it: an unsent one would otherwise be sent by a rule that is gone)
    DELETE FROM identity_sync.notification x WHERE x.id = n.id;
    PERFORM identity_sync._audit('drop_notification', name, to_jsonb(n), NULL);
END
$$;

-- Do rules for `on_event` exist that may concern target `target_id`? (Cheap: the planner asks
-- before building any context, so that it costs nothing without rules.)
CREATE FUNCTION identity_sync._has_notifications(events text[], target_id int) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM identity_sync.notification n
                    WHERE n.on_event = ANY (events)
                      AND (n.target_id IS NULL OR n.target_id = _has_notifications.target_id))
$$;

-- The target as a notice's context: name, kind, and what status says of a hold or quarantine.
CREATE FUNCTION identity_sync._notice_target(target_id int) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object('id', t.id, 'name', t.name, 'kind', t.kind, 'url', t.url,
                                                'held', t.held, 'quarantined_at', t.quarantined_at,
                                                'quarantine_reason', t.quarantine_reason, 'plan_error', t.plan_error))
      FROM identity_sync.target t WHERE t.id = target_id
$$;

-- One evaluation of a rule's query (_notice_query) as identity_sync.run_as, read-only and
-- bounded (src/evaluate.rs); an error comes back as `error` (timed_out: it was our bound).
CREATE FUNCTION identity_sync._notice_eval(q text, names text[], keys text[], contexts text[],
                                           OUT rows identity_sync._notice_row[], OUT error text, OUT timed_out boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    timed_out := false;
    PERFORM identity_sync._use_user_search_path();
    rows := identity_sync._evaluate(q, NULL::identity_sync._notice_row[], names, keys, identity_sync._today(), 0, contexts);
EXCEPTION WHEN query_canceled THEN
    IF NOT identity_sync._timed_out() THEN
        RAISE;   -- cancelled from outside: not ours to swallow
    END IF;
    error := SQLERRM;
    timed_out := true;
WHEN OTHERS THEN
    error := SQLERRM;
END
$$;

-- Evaluate rule n for its contexts and write the notices. A context is a JSON object:
-- person_key (NULL for events about a target), event, account, request, target (jsonb, the
-- rule's names), target_id and about (what caused it, for trace and deduplication). Recipients
-- that are NULL or empty skip the message (a 'skipped' notice says so); an evaluation that
-- fails records a 'failed' notice with the error: a broken rule never fails what caused it.
-- `held`: about events a threshold holds; the notices wait as 'held' until release (each
-- message for itself, not collected into a digest).
CREATE FUNCTION identity_sync._notify(n identity_sync.notification, contexts jsonb[], held boolean DEFAULT false)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q text := identity_sync._notice_query(n);
    got identity_sync._notice_row[] := '{}';
    res record;
    names text[] := ARRAY[format('notification "%s"', n.name)];
    keys text[] := ARRAY(SELECT DISTINCT c->>'person_key' FROM unnest(contexts) AS c WHERE c->>'person_key' IS NOT NULL);
    texts text[] := ARRAY(SELECT c::text FROM unnest(contexts) WITH ORDINALITY AS x(c, o) ORDER BY o);
    period interval := (n.options->>'digest')::interval;
    failures jsonb[] := '{}';
    i int;
    written int;
BEGIN
    IF cardinality(contexts) = 0 THEN
        RETURN 0;
    END IF;
    res := identity_sync._notice_eval(q, names, keys, texts);
    IF res.error IS NULL THEN
        got := coalesce(res.rows, '{}');
    ELSIF res.timed_out OR cardinality(contexts) = 1 THEN
        failures := ARRAY(SELECT jsonb_build_object('ord', g.k, 'error', res.error)
                            FROM generate_series(1, cardinality(contexts)) AS g(k));
    ELSE
        -- One context's data broke the query (a subquery with two rows): one by one, so that only
        -- its notice fails.
        FOR i IN 1 .. cardinality(contexts) LOOP
            res := identity_sync._notice_eval(q, names, array_remove(ARRAY[contexts[i]->>'person_key'], NULL), ARRAY[texts[i]]);
            IF res.error IS NULL THEN
                got := got || ARRAY(SELECT ROW(i, x.recipients, x.subject, x.body)::identity_sync._notice_row
                                      FROM unnest(res.rows) AS x);
            ELSE
                failures := failures || jsonb_build_object('ord', i, 'error', res.error);
            END IF;
        END LOOP;
    END IF;

    WITH r AS (
        SELECT x.ord, x.recipients, x.subject, x.body, contexts[x.ord] AS ctx,
               ARRAY(SELECT DISTINCT btrim(a) FROM jsonb_array_elements_text(
                         CASE jsonb_typeof(x.recipients) WHEN 'array' THEN x.recipients
                                                         WHEN 'string' THEN jsonb_build_array(x.recipients)
                                                         ELSE '[]' END) AS a
                      WHERE btrim(a) <> '') AS addrs
          FROM unnest(got) AS x),
    why AS (
        -- skipped: no recipient; failed: the evaluation failed; skipped too: no such person
        SELECT r.ctx, 'skipped' AS state,
               CASE WHEN r.recipients IS NULL OR jsonb_typeof(r.recipients) = 'null'
                    THEN 'the recipients expression gave NULL' ELSE 'the recipients expression gave no address' END AS error
          FROM r WHERE cardinality(r.addrs) = 0
        UNION ALL
        SELECT contexts[(f->>'ord')::int], 'failed', f->>'error' FROM unnest(failures) AS f
        UNION ALL
        SELECT c.ctx, 'skipped', 'the person is not in the person source'
          FROM unnest(contexts) WITH ORDINALITY AS c(ctx, o)
         WHERE c.ctx->>'person_key' IS NOT NULL
           AND NOT EXISTS (SELECT FROM r WHERE r.ord = c.o)
           AND NOT EXISTS (SELECT FROM unnest(failures) AS f WHERE (f->>'ord')::int = c.o)),
    noted AS (
        INSERT INTO identity_sync.notice (notification_id, target_id, persons, about, state, last_error)
        SELECT n.id, (w.ctx->>'target_id')::int, array_remove(ARRAY[w.ctx->>'person_key'], NULL),
               ARRAY[w.ctx->>'about'], w.state, w.error
          FROM why w
        RETURNING 1),
    each AS (
        SELECT r.ctx, a AS recipient, r.subject, r.body FROM r, unnest(r.addrs) AS a),
    plain AS (
        INSERT INTO identity_sync.notice (notification_id, target_id, persons, about, recipient, subject, body, state)
        SELECT n.id, (e.ctx->>'target_id')::int, array_remove(ARRAY[e.ctx->>'person_key'], NULL),
               ARRAY[e.ctx->>'about'], e.recipient, e.subject, e.body, CASE WHEN held THEN 'held' ELSE 'pending' END
          FROM each e WHERE period IS NULL
        RETURNING 1),
    -- A digest: one message per recipient, collecting until its period is over.
    collected AS (
        INSERT INTO identity_sync.notice AS x (notification_id, target_id, persons, about, recipient, subject, body,
                                               items, digest, due_at, state)
        SELECT n.id, min((e.ctx->>'target_id')::int),
               array_remove(array_agg(DISTINCT e.ctx->>'person_key'), NULL), array_agg(e.ctx->>'about'),
               e.recipient, min(e.subject), string_agg(e.body, E'\n\n----\n\n'), count(*), NOT held, now() + period,
               CASE WHEN held THEN 'held' ELSE 'pending' END
          FROM each e WHERE period IS NOT NULL
         GROUP BY e.recipient
        ON CONFLICT (notification_id, recipient) WHERE digest AND state = 'pending' AND attempts = 0
        DO UPDATE SET items = x.items + excluded.items,
                      body = x.body || E'\n\n----\n\n' || excluded.body,
                      persons = ARRAY(SELECT DISTINCT p FROM unnest(x.persons || excluded.persons) AS p),
                      about = x.about || excluded.about
        RETURNING 1)
    SELECT (SELECT count(*) FROM plain) + (SELECT count(*) FROM collected) INTO written;
    IF written > 0 THEN
        PERFORM identity_sync._wake_at_commit();
    END IF;
    RETURN written;
END
$$;

-- _notify, in a subtransaction of its own: whatever goes wrong with a rule (even a bug of
-- ours) is a WARNING, never an error of the plan, request or hold that caused the notice.
CREATE FUNCTION identity_sync._notify_safely(n identity_sync.notification, contexts jsonb[], held boolean DEFAULT false)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN identity_sync._notify(n, contexts, held);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'identity_sync: notification "%" failed: %', n.name, SQLERRM
        USING DETAIL = 'Nothing else is affected; its notices of this occasion are not written.';
    RETURN 0;
END
$$;

-- Notices of the rules on `on_event` (that concern target `target_id`, NULL: any) for these
-- contexts.
CREATE FUNCTION identity_sync._notify_event(on_event text, target_id int, contexts jsonb[])
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    total int := 0;
BEGIN
    FOR n IN SELECT * FROM identity_sync.notification x
              WHERE x.on_event = _notify_event.on_event
                AND (x.target_id IS NULL OR x.target_id = _notify_event.target_id)
              ORDER BY x.id LOOP
        total := total + identity_sync._notify_safely(n, contexts);
    END LOOP;
    RETURN total;
END
$$;

-- Notices of account events (create, update, enable, disable, delete) of target t: the events
-- `event_ids`; `dry` when t is a dry-run target (only rules with dry_run: true then); `held`
-- when a threshold holds them (their notices wait for release).
CREATE FUNCTION identity_sync._notify_events(t identity_sync.target, event_ids bigint[], dry boolean, held boolean)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    target_ctx jsonb := identity_sync._notice_target(t.id);
    total int := 0;
BEGIN
    FOR n IN SELECT * FROM identity_sync.notification x
              WHERE x.on_event IN ('create', 'update', 'enable', 'disable', 'delete')
                AND (x.target_id IS NULL OR x.target_id = t.id)
                AND (NOT dry OR coalesce((x.options->>'dry_run')::boolean, false))
              ORDER BY x.id LOOP
        total := total + identity_sync._notify_safely(n, ARRAY(
            SELECT jsonb_build_object(
                       'person_key', e.person_key, 'target_id', t.id, 'about', 'event ' || e.id,
                       'event', jsonb_build_object('id', e.id, 'kind', e.kind, 'seq', e.seq, 'state', e.state,
                                                   'target', t.name, 'person_key', e.person_key, 'plan_id', e.plan_id,
                                                   'payload', e.payload,
                                                   'attributes', coalesce(e.payload->'attributes', a.planned_attributes),
                                                   'dry_run', dry),
                       'account', jsonb_build_object('remote_id', a.remote_id, 'state', a.state,
                                                     'planned_state', a.planned_state,
                                                     'attributes', a.planned_attributes, 'groups', to_jsonb(a.planned_groups)),
                       'target', target_ctx)
              FROM identity_sync.event e
              LEFT JOIN identity_sync.account a ON a.target_id = e.target_id AND a.person_key = e.person_key
             WHERE e.id = ANY (event_ids) AND e.kind = n.on_event
             ORDER BY e.id), held);
    END LOOP;
    RETURN total;
END
$$;

-- An operator decided about held events (release, discard, 50_status.sql): the notices about
-- the released ones are due now, those about discarded ones go.
CREATE FUNCTION identity_sync._release_notices(target_id int, released bigint[]) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE identity_sync.notice x SET state = 'pending', due_at = now()
     WHERE x.target_id = _release_notices.target_id AND x.state = 'held'
       AND x.about && ARRAY(SELECT 'event ' || r FROM unnest(released) AS r);
    DELETE FROM identity_sync.notice x
     WHERE x.target_id = _release_notices.target_id AND x.state = 'held'
       AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.target_id = x.target_id AND e.state = 'held'
                         AND 'event ' || e.id = ANY (x.about));
$$;

-- Notices about a target as a whole (target_held, target_quarantined, plan_errors); `about`
-- says which occurrence (one notice per hold, per quarantine, per failure streak).
CREATE FUNCTION identity_sync._notify_target(on_event text, target_id int, about text, detail jsonb)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT identity_sync._has_notifications(ARRAY[on_event], target_id) THEN
        RETURN 0;
    END IF;
    RETURN identity_sync._notify_event(on_event, target_id, ARRAY[jsonb_build_object(
        'person_key', NULL, 'target_id', target_id, 'about', about,
        'event', jsonb_build_object('kind', on_event) || coalesce(detail, '{}'),
        'target', identity_sync._notice_target(target_id))]);
END
$$;

-- A self-service request as a notice's context (owners: the person keys of its current owners).
CREATE FUNCTION identity_sync._notice_request(r identity_sync.request) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.product;
BEGIN
    SELECT * INTO p FROM identity_sync.product x WHERE x.id = r.product_id;
    RETURN jsonb_build_object(
               'person_key', r.person_key, 'target_id', p.target_id, 'about', 'request ' || r.id,
               'request', jsonb_strip_nulls(jsonb_build_object(
                   'id', r.id, 'product', p.name, 'description', p.description, 'groups', to_jsonb(p.groups),
                   'target', (SELECT t.name FROM identity_sync.target t WHERE t.id = p.target_id),
                   'requester', r.person_key, 'requested_by', r.requested_by,
                   'reason', r.reason, 'state', r.state, 'requested_at', r.requested_at,
                   'decided_at', r.decided_at, 'expires_at', r.expires_at,
                   'owners', to_jsonb(identity_sync._owners(p, r.person_key)))),
               'target', identity_sync._notice_target(p.target_id));
END
$$;

-- Notices of a request event (request_pending, request_decided) for request r.
CREATE FUNCTION identity_sync._notify_request(on_event text, r identity_sync.request, extra jsonb DEFAULT '{}')
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target_id int := (SELECT p.target_id FROM identity_sync.product p WHERE p.id = r.product_id);
    ctx jsonb;
BEGIN
    IF NOT identity_sync._has_notifications(ARRAY[on_event], target_id) THEN
        RETURN 0;
    END IF;
    ctx := identity_sync._notice_request(r);
    ctx := jsonb_set(ctx, '{request}', (ctx->'request') || coalesce(extra, '{}'));
    RETURN identity_sync._notify_event(on_event, target_id, ARRAY[ctx]);
END
$$;

-- grant_expiring (housekeeping): approved grants that expire within a rule's lead_time, each
-- told once per rule.
CREATE FUNCTION identity_sync._notify_expiring() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n identity_sync.notification;
    total int := 0;
BEGIN
    FOR n IN SELECT * FROM identity_sync.notification x WHERE x.on_event = 'grant_expiring' ORDER BY x.id LOOP
        total := total + identity_sync._notify_safely(n, ARRAY(
            SELECT identity_sync._notice_request(r)
              FROM identity_sync.request r JOIN identity_sync.product p ON p.id = r.product_id
             WHERE r.state = 'approved'
               AND r.expires_at <= identity_sync._now() + coalesce((n.options->>'lead_time')::interval, interval '7 days')
               AND (n.target_id IS NULL OR p.target_id = n.target_id)
               AND NOT EXISTS (SELECT FROM identity_sync.notice x
                                WHERE x.about @> ARRAY['request ' || r.id] AND x.notification_id = n.id)
             ORDER BY r.id));
    END LOOP;
    RETURN total;
END
$$;

-- The worker's claim: up to max_rows due notices, leased for five minutes (a crash's are due
-- again then), with what sending them needs.
CREATE FUNCTION identity_sync._claim_notices(max_rows int)
RETURNS TABLE (id bigint, notification text, channel text, options jsonb, recipient text, subject text, body text,
               items int, attempt int)
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH c AS (
        UPDATE identity_sync.notice x
           SET state = 'sending', attempts = x.attempts + 1, sent_at = now(), due_at = now() + interval '5 minutes'
         WHERE x.id IN (SELECT y.id FROM identity_sync.notice y
                         WHERE y.state IN ('pending', 'retry', 'sending') AND y.due_at <= now()
                         ORDER BY y.due_at LIMIT max_rows FOR UPDATE SKIP LOCKED)
        RETURNING x.*)
    SELECT c.id, n.name, n.channel, n.options, c.recipient,
           CASE WHEN c.items > 1 THEN format('%s (+%s more)', c.subject, c.items - 1) ELSE c.subject END,
           c.body, c.items, c.attempts
      FROM c JOIN identity_sync.notification n ON n.id = c.notification_id
     ORDER BY c.id
$$;

-- The worker's record of what sending gave: per notice, NULL error = sent; a transient error is
-- tried again with the backoff of events (_retry_delay) until identity_sync.max_attempts.
CREATE FUNCTION identity_sync._record_notices(ids bigint[], errors text[], transient boolean[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE identity_sync.notice x
       SET state = CASE WHEN o.error IS NULL THEN 'sent'
                        WHEN o.transient AND x.attempts < identity_sync._max_attempts() THEN 'retry'
                        ELSE 'failed' END,
           due_at = CASE WHEN o.error IS NOT NULL AND o.transient THEN now() + identity_sync._retry_delay(x.attempts)
                         ELSE x.due_at END,
           last_error = left(o.error, 300),
           sent_at = CASE WHEN o.error IS NULL THEN now() ELSE x.sent_at END
      FROM unnest(ids, errors, transient) AS o(id, error, transient)
     WHERE x.id = o.id AND x.state = 'sending';
END
$$;

CREATE VIEW identity_sync.notifications AS
    SELECT n.name, n.on_event, t.name AS target, n.channel, n.recipients, n.subject, n.body, n.options, n.created_at
      FROM identity_sync.notification n LEFT JOIN identity_sync.target t ON t.id = n.target_id;

CREATE VIEW identity_sync.notices AS
    SELECT x.id, n.name AS notification, n.on_event, n.channel, t.name AS target, x.persons, x.about,
           x.recipient, x.subject, x.body, x.items, x.state, x.attempts, x.due_at, x.last_error, x.created_at, x.sent_at
      FROM identity_sync.notice x
      JOIN identity_sync.notification n ON n.id = x.notification_id
      LEFT JOIN identity_sync.target t ON t.id = x.target_id;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.add_notification(text, text, text, text, text, text, jsonb),
                          identity_sync.drop_notification(text)
   TO identity_sync_admin;
GRANT SELECT ON identity_sync.notifications, identity_sync.notices TO identity_sync_reader;

COMMENT ON FUNCTION identity_sync.add_notification(text, text, text, text, text, text, jsonb) IS 'Add a notification rule: on an event (create, update, enable, disable, delete, request_pending, request_decided, grant_expiring, target_held, target_quarantined, plan_errors), tell the recipients (SQL giving text or text[]) by mail or webhook; subject and body are SQL text expressions, checked now with the position of any error.';
COMMENT ON FUNCTION identity_sync.drop_notification(text) IS 'Drop a notification rule and its unsent notices.';
COMMENT ON VIEW identity_sync.notifications IS 'Notification rules: event, target (NULL: all), channel, recipients, subject and body expressions, options.';
COMMENT ON VIEW identity_sync.notices IS 'Notices written by the rules: recipient, subject, body, state (pending, sending, sent, retry, failed, skipped), attempts, last error.';
