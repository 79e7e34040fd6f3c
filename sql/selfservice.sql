-- Self-service access requests (products, requests, approvals).

-- Groups granted to a person in a target by approved, unexpired self-service requests; the
-- planner (_diff) adds them to the rules' groups while the person is enabled. Plain SQL, no SET
-- clause, so that the planner's query inlines it (it is evaluated for every planned person).
CREATE FUNCTION identity_sync._granted_groups(target_id int, person_key text, enabled boolean)
RETURNS text[] LANGUAGE sql STABLE AS $$
    SELECT '{}'::text[]
$$;

-- Expire approved grants past their validity; called by the worker on every tick.
CREATE FUNCTION identity_sync._expire_grants() RETURNS int
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT 0
$$;
