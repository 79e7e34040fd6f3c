-- Privileges and documentation. Runs last.

-- Nothing for PUBLIC but what design.md says (the self-service entry points, granted in the
-- self-service section below).
REVOKE ALL ON SCHEMA identity_sync FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA identity_sync FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA identity_sync FROM PUBLIC;
GRANT USAGE ON SCHEMA identity_sync TO identity_sync_reader, identity_sync_operator, identity_sync_admin;

-- Readers: status, registry, events, audit, configuration (never secrets).
GRANT SELECT ON identity_sync.status, identity_sync.accounts, identity_sync.events, identity_sync.audit_log,
                identity_sync.pending_changes, identity_sync.source, identity_sync.mapping, identity_sync.rule,
                identity_sync.plan_run, identity_sync.change, identity_sync.account, identity_sync.event
   TO identity_sync_reader;
GRANT SELECT (id, name, kind, url, options, paused, held, released_at, resync_total, resync_started_at, created_at, updated_at)
   ON identity_sync.target TO identity_sync_reader;
GRANT SELECT ON identity_sync.status TO pg_monitor;
GRANT EXECUTE ON FUNCTION identity_sync.wait_idle(interval), identity_sync.worker_status(),
                          identity_sync.normalize_diacritics(text), identity_sync.slug(text),
                          identity_sync.person_ref(anyelement)
   TO identity_sync_reader;

-- Operators: the levers.
GRANT EXECUTE ON FUNCTION identity_sync.pause(text), identity_sync.resume(text), identity_sync.release(text),
                          identity_sync.discard(text), identity_sync.retry(text), identity_sync.skip(bigint),
                          identity_sync.resync(text), identity_sync.preview(text, text), identity_sync.trace(text),
                          identity_sync.person(text)
   TO identity_sync_operator;

-- Admins: configuration.
GRANT EXECUTE ON FUNCTION identity_sync.add_person_source(regclass, text),
                          identity_sync.add_contract_source(regclass, text, text, text),
                          identity_sync.add_related_source(regclass, text),
                          identity_sync.drop_source(regclass),
                          identity_sync.set_primary_contract(text),
                          identity_sync.set_search_path(text),
                          identity_sync.set_snapshot_interval(regclass, interval),
                          identity_sync.set_clock(timestamptz),
                          identity_sync.add_target(text, text, text, jsonb),
                          identity_sync.alter_target(text, text, jsonb, text),
                          identity_sync.drop_target(text),
                          identity_sync.set_secret(text, text),
                          identity_sync.map(text, text, text, boolean, boolean),
                          identity_sync.unmap(text, text),
                          identity_sync.add_rule(text, text, text, text[]),
                          identity_sync.drop_rule(text, text)
   TO identity_sync_admin;

-- Self-service (any login mapped to a person): PUBLIC may call the entry points, read the
-- product catalog, and read its own rows of request and decision (row-level security; the
-- views my_requests and my_approvals are security_invoker views over them).
GRANT USAGE ON SCHEMA identity_sync TO PUBLIC;
GRANT EXECUTE ON FUNCTION identity_sync.request_access(text, text), identity_sync.approve(bigint, text),
                          identity_sync.deny(bigint, text), identity_sync.revoke(bigint),
                          identity_sync.current_person(), identity_sync.can_approve(bigint),
                          identity_sync.grant_status(bigint)
   TO PUBLIC;
GRANT SELECT ON identity_sync.products, identity_sync.my_requests, identity_sync.my_approvals,
                identity_sync.request, identity_sync.decision
   TO PUBLIC;
GRANT SELECT (id, name, target_id, groups, approval, valid_for, description) ON identity_sync.product TO PUBLIC;
GRANT SELECT (id, name) ON identity_sync.target TO PUBLIC;
GRANT SELECT ON identity_sync.product, identity_sync.requests TO identity_sync_reader;
GRANT EXECUTE ON FUNCTION identity_sync._grant_status(bigint) TO identity_sync_reader;
GRANT EXECUTE ON FUNCTION identity_sync.set_login(text),
                          identity_sync.add_product(text, text, text[], text, text, interval, text),
                          identity_sync.alter_product(text, text[], text, text, interval, text, text),
                          identity_sync.drop_product(text)
   TO identity_sync_admin;

-- HR writers need no privilege on the outbox: the capture trigger runs as the extension owner.
ALTER FUNCTION identity_sync._capture() SECURITY DEFINER;

-- Configuration, registry and history survive pg_dump / pg_restore.
SELECT pg_catalog.pg_extension_config_dump('identity_sync._settings', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.source', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._snapshot', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.target', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._secret', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.mapping', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.rule', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.account', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._unique', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.change', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._dirty', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.event', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync._audit', '');
-- (one statement each: every call rewrites the pg_extension row)
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.source', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.target', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.mapping', 'position')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.change', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.event', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync._audit', 'id')::regclass, '');

-- Say so when provisioning cannot happen here (pg_cron refuses to half-work in silence). A
-- WARNING, because PostgreSQL silences NOTICEs while it runs an extension script.
DO $check$
DECLARE
    s text := identity_sync.worker_status();
BEGIN
    IF s LIKE 'no worker%' THEN
        RAISE WARNING 'identity_sync: %', split_part(s, ' HINT: ', 1)
            USING HINT = split_part(s, ' HINT: ', 2);
    END IF;
END
$check$;

COMMENT ON SCHEMA identity_sync IS 'identity_sync: HR tables as the source of truth for identities';
COMMENT ON TABLE identity_sync.source IS 'Registered HR sources: the person source, the contract source, related sources.';
COMMENT ON TABLE identity_sync.change IS 'The change outbox: one row per captured statement, holding the affected person keys.';
COMMENT ON TABLE identity_sync.target IS 'Targets that get accounts: scim, webhook or table.';
COMMENT ON TABLE identity_sync.mapping IS 'Per target: attribute <- SQL expression over person, contract, contracts, today, iteration.';
COMMENT ON TABLE identity_sync.rule IS 'Per target: business rules (SQL conditions) and the groups they grant; a person is in scope when one matches.';
COMMENT ON TABLE identity_sync.account IS 'The account registry: person x target, applied and planned state.';
COMMENT ON TABLE identity_sync.event IS 'Provisioning events, delivered strictly in seq order per person and target.';
COMMENT ON TABLE identity_sync.plan_run IS 'One row per planner transaction: which persons it planned and how many events it wrote.';
COMMENT ON VIEW identity_sync.status IS 'One row per target: state (active, paused, held, failing), accounts and events by state, oldest pending age, last success and error, deliveries in the last hour, resync progress.';
COMMENT ON VIEW identity_sync.accounts IS 'The account registry by target name.';
COMMENT ON VIEW identity_sync.events IS 'Provisioning events by target name, with their delivery latency.';
COMMENT ON VIEW identity_sync.audit_log IS 'Every configuration and operator call: who, when, what, old and new (secrets never).';
COMMENT ON VIEW identity_sync.pending_changes IS 'Persons changed in HR and not yet planned, one row each, with the source and time of the first change.';
COMMENT ON FUNCTION identity_sync.add_person_source(regclass, text) IS 'Register the person source: one row per person, identified by key (primary key or unique column).';
COMMENT ON FUNCTION identity_sync.add_contract_source(regclass, text, text, text) IS 'Register the contract source: time-ranged rows (starts, inclusive ends; NULL = open) of a person.';
COMMENT ON FUNCTION identity_sync.add_related_source(regclass, text) IS 'Register a related table; affected is a query over the changed rows ("changed") returning person keys.';
COMMENT ON FUNCTION identity_sync.drop_source(regclass) IS 'Unregister a source and remove its capture triggers.';
COMMENT ON FUNCTION identity_sync.set_primary_contract(text) IS 'ORDER BY over contract (and today) choosing the primary contract; NULL restores the default (active first, latest end, latest start).';
COMMENT ON FUNCTION identity_sync.set_search_path(text) IS 'search_path for user expressions (mappings, rules, affected queries, owners), in checks and in the worker; default public.';
COMMENT ON FUNCTION identity_sync.set_snapshot_interval(regclass, interval) IS 'How often a view or foreign table source is compared with its last snapshot.';
COMMENT ON FUNCTION identity_sync.set_clock(timestamptz) IS 'Evaluate "now" as the given time (NULL = real time): for tests, replays and what-if checks.';
COMMENT ON FUNCTION identity_sync.person(text) IS 'The person document: person row, contracts, primary contract, active today.';
COMMENT ON FUNCTION identity_sync.add_target(text, text, text, jsonb) IS 'Add a target (scim, webhook or table) with validated options.';
COMMENT ON FUNCTION identity_sync.alter_target(text, text, jsonb, text) IS 'Change a target: NULL means unchanged; options are merged, a key set to null is removed.';
COMMENT ON FUNCTION identity_sync.drop_target(text) IS 'Drop a target with its mappings, rules, registry and events.';
COMMENT ON FUNCTION identity_sync.set_secret(text, text) IS 'Set a target''s token, password, client secret or signing key; never readable back.';
COMMENT ON FUNCTION identity_sync.map(text, text, text, boolean, boolean) IS 'Map attribute <- SQL expression; validated now, with the position of any error inside the expression.';
COMMENT ON FUNCTION identity_sync.unmap(text, text) IS 'Remove an attribute mapping.';
COMMENT ON FUNCTION identity_sync.add_rule(text, text, text, text[]) IS 'Add a business rule: a boolean SQL condition and the groups it grants.';
COMMENT ON FUNCTION identity_sync.drop_rule(text, text) IS 'Remove a business rule.';
COMMENT ON FUNCTION identity_sync.pause(text) IS 'Stop delivering to a target (planning goes on).';
COMMENT ON FUNCTION identity_sync.resume(text) IS 'Resume delivering to a paused target.';
COMMENT ON FUNCTION identity_sync.release(text) IS 'Let the events held by a threshold go out.';
COMMENT ON FUNCTION identity_sync.discard(text) IS 'Drop the events held by a threshold.';
COMMENT ON FUNCTION identity_sync.retry(text) IS 'Retry failed events of a target (by name) or one event (by id).';
COMMENT ON FUNCTION identity_sync.skip(bigint) IS 'Give up on one failed event so the person''s later events go on.';
COMMENT ON FUNCTION identity_sync.resync(text) IS 'Full reconcile of every person for a target, in batches; progress in status.';
COMMENT ON FUNCTION identity_sync.wait_idle(interval) IS 'Wait until nothing is dirty, pending or in flight; false on timeout.';
COMMENT ON FUNCTION identity_sync.preview(text, text) IS 'What a plan would do for a person now, per target; changes nothing.';
COMMENT ON FUNCTION identity_sync.trace(text) IS 'The story of one person: changes, plans, events and results in time order.';
COMMENT ON FUNCTION identity_sync.normalize_diacritics(text) IS 'Remove diacritics, Unicode-correct: ''Zoë Ångström-Çelik'' -> ''Zoe Angstrom-Celik'' (also ß, ø, ł, dotless i).';
COMMENT ON FUNCTION identity_sync.slug(text) IS 'Login-safe form: diacritics removed, lower case, only a-z 0-9 . - _.';
COMMENT ON FUNCTION identity_sync.name_variants(text, text) IS 'Family-name prefixes (''van der Berg''): prefix, core name, family, display, sort key and login forms.';
COMMENT ON FUNCTION identity_sync.worker_status() IS 'Whether a worker serves this database: ''running (pid N)'' or ''no worker: ... HINT: ...''.';
COMMENT ON FUNCTION identity_sync.person_ref(anyelement) IS 'An attribute value referring to another person (e.g. manager): sent as that person''s account id in the target.';
