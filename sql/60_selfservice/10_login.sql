-- Self-service access requests (60_selfservice/): who is calling (here), products and their
-- owners (20_products), requests and decisions (30_requests), what each login sees (40_views).
-- The tables are in 00_schema.sql.
--
-- Employees ask for extra access (a VPN group, a project share) beyond what business rules
-- grant; the owners of the product approve. Who the owners are follows HR data: `owners` is
-- a SQL condition over the candidate `owner` and the `requester`, evaluated at the moment of the
-- decision, so a department head who left yesterday can no longer approve today.
--
-- Who is who: set_login() maps each person to a PostgreSQL role name. A login acts as its own
-- person only: the caller is session_user, or the role it switched to with SET ROLE (which
-- PostgreSQL allows only to members of that role).
--
-- Security: every function PUBLIC may call is SECURITY DEFINER with a fixed search_path, and user
-- SQL (login expression, owners) runs with the admin's search_path and pg_temp last, so a login
-- cannot plant a temporary table in place of an HR table. The views my_requests and my_approvals
-- are security_invoker views over identity_sync.request and identity_sync.decision, which have
-- row-level security: a login sees its own requests, the requests it can decide now, and the
-- ones it decided.
--
-- Approved requests add the product's groups to the person's desired state in the target
-- (_granted_groups, called by the planner), so the planner grants and revokes them like any
-- rule's groups. The worker expires grants past valid_for (_expire_grants, every tick).

------------------------------------------------------------------------------------------------
-- Who is calling
------------------------------------------------------------------------------------------------

-- The calling role: the role switched to with SET ROLE, else the session's login. (Inside a
-- SECURITY DEFINER function current_user is the owner; the "role" setting is not changed by it.)
CREATE FUNCTION identity_sync._caller() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user::text
                ELSE current_setting('role') END
$$;

-- The person whose login is `role`, by the login expression; NULL when none. Remembered until
-- the transaction ends (src/selfservice.rs): row-level security asks once per row.
CREATE FUNCTION identity_sync._person_of_role(role text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expr text := (SELECT login_expression FROM identity_sync._settings);
    p identity_sync.source := identity_sync._person_source();
    login text;
    keys text[];
BEGIN
    IF expr IS NULL OR p.id IS NULL OR role IS NULL THEN
        RETURN NULL;
    END IF;
    login := p.relation::text || ': ' || expr;
    keys := identity_sync._remembered_person(role, login);
    IF keys IS NOT NULL THEN
        RETURN keys[1];
    END IF;
    -- As identity_sync.run_as, read-only, bounded (src/evaluate.rs).
    PERFORM identity_sync._use_user_search_path();
    keys := identity_sync._evaluate(
        format('SELECT array_agg(k) FROM (SELECT person.%I::text AS k FROM %s AS person WHERE (%s)::text = $4[1] LIMIT 2) AS q',
               p.key_column, p.relation, expr),
        NULL::text[], ARRAY['login expression'], a4 => ARRAY[role]);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF cardinality(keys) > 1 THEN
        RAISE EXCEPTION 'role "%" is the login of more than one person', role
            USING ERRCODE = 'cardinality_violation',
                  DETAIL = format('Persons %s have it.', array_to_string(keys, ', ')),
                  HINT = 'The login expression (identity_sync.set_login) must give every person a role of their own.';
    END IF;
    PERFORM identity_sync._remember_person(role, login, keys[1]);
    RETURN keys[1];
END
$$;

-- The caller's person, or an error saying why there is none.
CREATE FUNCTION identity_sync._me() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._caller();
    me text;
BEGIN
    IF (SELECT login_expression FROM identity_sync._settings) IS NULL THEN
        RAISE EXCEPTION 'self-service is not set up: no login expression'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'An administrator maps persons to roles with identity_sync.set_login(), e.g. ''emp_'' || person.emp_no::text.';
    END IF;
    me := identity_sync._person_of_role(role);
    IF me IS NULL THEN
        RAISE EXCEPTION 'role "%" is not the login of any person', role
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Self-service requests and approvals are made by persons, found by the login expression of identity_sync.set_login().',
                  HINT = 'Log in with your own role, or ask an administrator to check the login expression.';
    END IF;
    RETURN me;
END
$$;

CREATE FUNCTION identity_sync.current_person() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._person_of_role(identity_sync._caller())
$$;

CREATE FUNCTION identity_sync.set_login(expression text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source;
    typ regtype;
    dup jsonb;
    counts bigint[];
    persons bigint;
    with_role bigint;
BEGIN
    IF nullif(btrim(expression), '') IS NULL THEN
        PERFORM identity_sync._set_setting('set_login', 'login_expression', NULL::text);
        RETURN;
    END IF;
    p := identity_sync._require_person_source();
    PERFORM identity_sync._check_single_expression('login expression', expression);
    PERFORM identity_sync._use_user_search_path();
    typ := identity_sync._check_expression(
        'SELECT (' || expression || E'\n) AS v FROM ' || p.relation::text || ' AS person LIMIT 0', 8, expression,
        'login expression');
    PERFORM identity_sync._check_one_value('login expression', 'SELECT 1 FROM ' || p.relation::text || ' AS person WHERE', expression);
    IF typ NOT IN ('text'::regtype, 'character varying'::regtype, 'name'::regtype, 'character'::regtype) THEN
        RAISE EXCEPTION 'the login expression must give a role name (text), not %', typ
            USING ERRCODE = 'datatype_mismatch', DETAIL = expression,
                  HINT = 'Cast it, e.g. ''emp_'' || person.emp_no::text.';
    END IF;
    -- A role must be the login of one person at most.
    -- (Over every person, as identity_sync.run_as, read-only, bounded: src/evaluate.rs.)
    dup := identity_sync._evaluate(
        format('SELECT to_jsonb(d) FROM (SELECT v, count(*) AS n, array_to_string((array_agg(k ORDER BY k))[1:5], '', '') AS keys FROM ('
               'SELECT (%s)::text AS v, person.%I::text AS k FROM %s AS person) AS q '
               'WHERE v IS NOT NULL GROUP BY v HAVING count(*) > 1 ORDER BY v LIMIT 1) AS d',
               expression, p.key_column, p.relation),
        NULL::jsonb, ARRAY['login expression']);
    IF dup IS NOT NULL THEN
        RAISE EXCEPTION 'the login expression gives role "%" to % persons', dup->>'v', dup->>'n'
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('Persons %s%s.', dup->>'keys', CASE WHEN (dup->>'n')::bigint > 5 THEN format(' and %s more', (dup->>'n')::bigint - 5) ELSE '' END),
                  HINT = 'Every person needs a role of their own; include the person key in the expression.';
    END IF;
    counts := identity_sync._evaluate(
        format('SELECT ARRAY[count(*), count(r.oid)] FROM (SELECT (%s)::text AS v FROM %s AS person) AS q '
               'LEFT JOIN pg_catalog.pg_roles r ON r.rolname = q.v', expression, p.relation),
        NULL::bigint[], ARRAY['login expression']);
    persons := counts[1];
    with_role := counts[2];
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    PERFORM identity_sync._set_setting('set_login', 'login_expression', expression);
    IF persons > 10000 THEN
        RAISE NOTICE '% of % persons have a role of that name', with_role, persons
            USING HINT = format('Each self-service call looks the caller up with this expression; index it, e.g. CREATE INDEX ON %s ((%s));',
                                p.relation, regexp_replace(expression, '\mperson\.', '', 'g'));
    ELSE
        RAISE NOTICE '% of % persons have a role of that name', with_role, persons;
    END IF;
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.current_person() TO PUBLIC;
GRANT EXECUTE ON FUNCTION identity_sync.set_login(text) TO identity_sync_admin;

COMMENT ON FUNCTION identity_sync.set_login(text) IS 'SQL over person giving each person''s PostgreSQL role name (e.g. ''emp_'' || person.emp_no::text), so a login knows which person it is; NULL disables self-service.';
COMMENT ON FUNCTION identity_sync.current_person() IS 'The person key of the calling login (session_user, or the role set with SET ROLE), by the login expression; NULL when none.';
