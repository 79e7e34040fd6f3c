-- Self-service access requests: products, requests, decisions.
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

CREATE TABLE identity_sync.product (
    id          int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (btrim(name) <> ''),
    target_id   int NOT NULL REFERENCES identity_sync.target ON DELETE CASCADE,
    groups      text[] NOT NULL CHECK (cardinality(groups) > 0),
    owners      text NOT NULL,          -- SQL condition over owner, requester, requester_contract, ...
    approval    text NOT NULL DEFAULT 'any' CHECK (approval IN ('any', 'all')),
    valid_for   interval CHECK (valid_for > interval '0'),   -- NULL: until revoked
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity_sync.request (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id   int NOT NULL REFERENCES identity_sync.product ON DELETE CASCADE,
    person_key   text NOT NULL,          -- the requester, who is also the person granted
    requested_by text NOT NULL,          -- the requester's role
    reason       text,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'approved', 'denied', 'withdrawn', 'revoked', 'expired')),
    approvals    int NOT NULL DEFAULT 0, -- approvals so far (approval 'all' needs every current owner)
    requested_at timestamptz NOT NULL,   -- times are identity_sync's "now" (set_clock)
    decided_at   timestamptz,
    expires_at   timestamptz,            -- approved with valid_for: when the grant ends
    ended_at     timestamptz,            -- revoked, withdrawn or expired
    ended_by     text                    -- role that revoked or withdrew; 'identity_sync' for expiry
);
-- One open request per person and product.
CREATE UNIQUE INDEX request_open ON identity_sync.request (product_id, person_key)
    WHERE state IN ('pending', 'approved');
CREATE INDEX request_person ON identity_sync.request (person_key);
CREATE INDEX request_pending ON identity_sync.request (id) WHERE state = 'pending';
CREATE INDEX request_expiry ON identity_sync.request (expires_at) WHERE state = 'approved';

CREATE TABLE identity_sync.decision (
    request_id bigint NOT NULL REFERENCES identity_sync.request ON DELETE CASCADE,
    person_key text NOT NULL,            -- the owner who decided
    decided_by text NOT NULL,            -- the owner's role
    requester  text NOT NULL,            -- the request's person (row-level security without a join)
    decision   text NOT NULL CHECK (decision IN ('approve', 'deny')),
    comment    text,
    at         timestamptz NOT NULL,
    PRIMARY KEY (request_id, person_key)
);
CREATE INDEX decision_person ON identity_sync.decision (person_key);
CREATE INDEX decision_requester ON identity_sync.decision (requester);

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
    PERFORM identity_sync._use_user_search_path();
    EXECUTE format('SELECT array_agg(k) FROM (SELECT person.%I::text AS k FROM %s AS person WHERE (%s)::text = $1 LIMIT 2) AS q',
                   p.key_column, p.relation, expr)
       INTO keys USING role;
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
    p identity_sync.source := identity_sync._person_source();
    old text := (SELECT login_expression FROM identity_sync._settings);
    typ regtype;
    dup record;
    persons bigint;
    with_role bigint;
BEGIN
    IF nullif(btrim(expression), '') IS NULL THEN
        UPDATE identity_sync._settings SET login_expression = NULL;
        PERFORM identity_sync._audit('set_login', NULL, to_jsonb(old), NULL);
        RETURN;
    END IF;
    IF p.id IS NULL THEN
        RAISE EXCEPTION 'no person source is registered' USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Register one first: SELECT identity_sync.add_person_source(''hr.employee'', ''emp_no'');';
    END IF;
    IF expression ~ ';' AND expression !~ '''' THEN
        RAISE EXCEPTION 'expression must be a single SQL expression' USING ERRCODE = 'syntax_error', DETAIL = expression;
    END IF;
    PERFORM identity_sync._use_user_search_path();
    typ := identity_sync._check_expression(
        'SELECT (' || expression || E'\n) AS v FROM ' || p.relation::text || ' AS person LIMIT 0', 8, expression);
    IF typ NOT IN ('text'::regtype, 'character varying'::regtype, 'name'::regtype, 'character'::regtype) THEN
        RAISE EXCEPTION 'the login expression must give a role name (text), not %', typ
            USING ERRCODE = 'datatype_mismatch', DETAIL = expression,
                  HINT = 'Cast it, e.g. ''emp_'' || person.emp_no::text.';
    END IF;
    -- A role must be the login of one person at most.
    EXECUTE format('SELECT v, count(*) AS n, array_to_string((array_agg(k ORDER BY k))[1:5], '', '') AS keys FROM ('
                   'SELECT (%s)::text AS v, person.%I::text AS k FROM %s AS person) AS q '
                   'WHERE v IS NOT NULL GROUP BY v HAVING count(*) > 1 ORDER BY v LIMIT 1',
                   expression, p.key_column, p.relation) INTO dup;
    IF dup.v IS NOT NULL THEN
        RAISE EXCEPTION 'the login expression gives role "%" to % persons', dup.v, dup.n
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('Persons %s%s.', dup.keys, CASE WHEN dup.n > 5 THEN format(' and %s more', dup.n - 5) ELSE '' END),
                  HINT = 'Every person needs a role of their own; include the person key in the expression.';
    END IF;
    EXECUTE format('SELECT count(*), count(r.oid) FROM (SELECT (%s)::text AS v FROM %s AS person) AS q '
                   'LEFT JOIN pg_catalog.pg_roles r ON r.rolname = q.v', expression, p.relation)
       INTO persons, with_role;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    UPDATE identity_sync._settings SET login_expression = expression;
    PERFORM identity_sync._audit('set_login', NULL, to_jsonb(old), to_jsonb(expression));
    IF persons > 10000 THEN
        RAISE NOTICE '% of % persons have a role of that name', with_role, persons
            USING HINT = format('Each self-service call looks the caller up with this expression; index it, e.g. CREATE INDEX ON %s ((%s));',
                                p.relation, regexp_replace(expression, '\mperson\.', '', 'g'));
    ELSE
        RAISE NOTICE '% of % persons have a role of that name', with_role, persons;
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Products and their owners
------------------------------------------------------------------------------------------------

-- ORDER BY choosing the primary contract (as in _from_clause): the configured one or the default.
CREATE FUNCTION identity_sync._primary_contract_order() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT primary_contract_order FROM identity_sync._settings), format(
        '(contract.%1$I <= today AND (contract.%2$I IS NULL OR contract.%2$I >= today)) DESC, contract.%2$I DESC NULLS FIRST, contract.%1$I DESC',
        c.starts_column, c.ends_column))
      FROM identity_sync._contract_source() AS c
$$;

-- FROM clause binding owner (every person), requester (the person with key $1[1]),
-- requester_contract and owner_contract (their primary contracts) and today ($2).
CREATE FUNCTION identity_sync._owners_from(with_owner_contract boolean)
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
    c identity_sync.source := identity_sync._contract_source();
    keytype regtype;
    sql text;
BEGIN
    IF p.id IS NULL THEN
        RAISE EXCEPTION 'no person source is registered' USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Register one first: SELECT identity_sync.add_person_source(''hr.employee'', ''emp_no'');';
    END IF;
    keytype := identity_sync._column_type(p.relation, p.key_column, 'person key');
    sql := format('FROM %1$s AS owner CROSS JOIN LATERAL (SELECT $2::date AS today) AS _p '
                  'JOIN %1$s AS requester ON requester.%2$I = ANY ($1::text[]::%3$s[]) ',
                  p.relation, p.key_column, keytype);
    IF c.id IS NULL THEN
        sql := sql || 'CROSS JOIN LATERAL (SELECT NULL::record AS requester_contract, NULL::record AS owner_contract) AS _c ';
    ELSE
        sql := sql || format('LEFT JOIN LATERAL (SELECT * FROM %1$s AS contract WHERE contract.%2$I = requester.%3$I ORDER BY %4$s LIMIT 1) AS requester_contract ON true ',
                             c.relation, c.key_column, p.key_column, identity_sync._primary_contract_order());
        IF with_owner_contract THEN
            sql := sql || format('LEFT JOIN LATERAL (SELECT * FROM %1$s AS contract WHERE contract.%2$I = owner.%3$I ORDER BY %4$s LIMIT 1) AS owner_contract ON true ',
                                 c.relation, c.key_column, p.key_column, identity_sync._primary_contract_order());
        END IF;
    END IF;
    RETURN sql;
END
$$;

-- Check an owners condition: a boolean over owner, requester, requester_contract,
-- owner_contract and today; errors carry the position inside the condition.
CREATE FUNCTION identity_sync._check_owners(owners text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    typ regtype;
BEGIN
    IF owners IS NULL OR btrim(owners) = '' THEN
        RAISE EXCEPTION 'owners condition is empty' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example: EXISTS (SELECT FROM dept_manager m WHERE m.emp_no = owner.emp_no AND m.dept_no = requester_contract.dept_no AND today BETWEEN m.from_date AND m.to_date)';
    END IF;
    IF owners ~ ';' AND owners !~ '''' THEN
        RAISE EXCEPTION 'owners must be a single SQL expression' USING ERRCODE = 'syntax_error', DETAIL = owners;
    END IF;
    -- Build the probe before switching to the user search_path (names are then qualified).
    DECLARE
        q text := 'SELECT (' || owners || E'\n) AS v ' || identity_sync._owners_from(true) || ' LIMIT 0';
    BEGIN
        PERFORM identity_sync._use_user_search_path();
        typ := identity_sync._check_expression(q, 8, owners);
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    END;
    IF typ <> 'boolean'::regtype THEN
        RAISE EXCEPTION 'owners condition must be boolean, not %', typ USING ERRCODE = 'datatype_mismatch',
            DETAIL = owners;
    END IF;
END
$$;

-- Current owners of product `p` for the persons `requesters`, as (requester, owner) pairs: active
-- persons today (a contract covers today) other than the requester for whom the owners
-- condition holds. With `candidates`, only those persons are considered as owners. One query
-- for many requesters: my_approvals asks for every pending request at once.
CREATE FUNCTION identity_sync._owner_pairs(p identity_sync.product, requesters text[], candidates text[] DEFAULT NULL)
RETURNS TABLE (requester text, owner text) LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ps identity_sync.source := identity_sync._person_source();
    c identity_sync.source := identity_sync._contract_source();
    keytype regtype;
    sql text;
BEGIN
    keytype := identity_sync._column_type(ps.relation, ps.key_column, 'person key');
    sql := format('SELECT DISTINCT requester.%1$I::text, owner.%1$I::text %2$s WHERE owner.%1$I::text <> requester.%1$I::text ',
                  ps.key_column, identity_sync._owners_from(p.owners ~* '\mowner_contract\M'));
    IF candidates IS NOT NULL THEN
        sql := sql || format('AND owner.%I = ANY ($3::text[]::%s[]) ', ps.key_column, keytype);
    END IF;
    IF c.id IS NOT NULL THEN
        sql := sql || format('AND EXISTS (SELECT FROM %1$s AS c WHERE c.%2$I = owner.%3$I AND c.%4$I::date <= today '
                             'AND (c.%5$I IS NULL OR c.%5$I::date >= today)) ',
                             c.relation, c.key_column, ps.key_column, c.starts_column, c.ends_column);
    END IF;
    sql := sql || 'AND (' || p.owners || E'\n)';
    PERFORM identity_sync._use_user_search_path();
    RETURN QUERY EXECUTE sql USING requesters, identity_sync._today(), candidates;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
END
$$;

-- The current owners of product `p` for the person `requester` (among `candidates`, if given).
CREATE FUNCTION identity_sync._owners(p identity_sync.product, requester text, candidates text[] DEFAULT NULL)
RETURNS text[] LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY(SELECT o.owner FROM identity_sync._owner_pairs(p, ARRAY[requester], candidates) AS o ORDER BY 1)
$$;

CREATE FUNCTION identity_sync._product(name text) RETURNS identity_sync.product
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.product;
BEGIN
    SELECT * INTO p FROM identity_sync.product WHERE product.name = _product.name;
    IF p.id IS NULL THEN
        RAISE EXCEPTION 'product "%" does not exist', name USING ERRCODE = 'undefined_object',
            HINT = coalesce('Products: ' || (SELECT string_agg(product.name, ', ' ORDER BY product.name) FROM identity_sync.product) || '.',
                            'There are no products yet.');
    END IF;
    RETURN p;
END
$$;

CREATE FUNCTION identity_sync._check_groups(groups text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF groups IS NULL OR cardinality(groups) = 0 THEN
        RAISE EXCEPTION 'a product needs at least one group' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example ''{vpn-users}''.';
    END IF;
    IF EXISTS (SELECT FROM unnest(groups) AS g WHERE g IS NULL OR btrim(g) = '') THEN
        RAISE EXCEPTION 'group names must not be empty' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('groups are %s.', groups);
    END IF;
    RETURN ARRAY(SELECT DISTINCT g FROM unnest(groups) AS g ORDER BY g);
END
$$;

CREATE FUNCTION identity_sync._check_approval(approval text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF approval IS NULL OR approval NOT IN ('any', 'all') THEN
        RAISE EXCEPTION 'invalid approval "%"', approval USING ERRCODE = 'invalid_parameter_value',
            HINT = 'any: one current owner approves; all: every current owner approves.';
    END IF;
    RETURN approval;
END
$$;

CREATE FUNCTION identity_sync._check_valid_for(valid_for interval) RETURNS interval
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF valid_for IS NOT NULL AND valid_for <= interval '0' THEN
        RAISE EXCEPTION 'valid_for must be positive, not %', valid_for USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL means the grant lasts until it is revoked.';
    END IF;
    RETURN valid_for;
END
$$;

-- Mark persons for planning (their self-service grants changed). Through the outbox, like any
-- change, so the planner never misses a grant committed while it runs.
CREATE FUNCTION identity_sync._replan(keys text[], op text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF cardinality(keys) > 0 THEN
        INSERT INTO identity_sync.change (source_id, op, keys) VALUES (NULL, op, keys);
        PERFORM identity_sync._wake_at_commit();
    END IF;
END
$$;

CREATE FUNCTION identity_sync.add_product(name text, target text, groups text[], owners text,
                                          approval text DEFAULT 'any', valid_for interval DEFAULT NULL,
                                          description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    g text[] := identity_sync._check_groups(groups);
    a text := identity_sync._check_approval(approval);
    v interval := identity_sync._check_valid_for(valid_for);
    p identity_sync.product;
BEGIN
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'product name is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM identity_sync.product WHERE product.name = add_product.name) THEN
        RAISE EXCEPTION 'product "%" already exists', name USING ERRCODE = 'duplicate_object',
            HINT = 'Change it with identity_sync.alter_product(), or drop it first with identity_sync.drop_product().';
    END IF;
    PERFORM identity_sync._check_owners(owners);
    INSERT INTO identity_sync.product (name, target_id, groups, owners, approval, valid_for, description)
    VALUES (name, t.id, g, owners, a, v, description)
    RETURNING * INTO p;
    PERFORM identity_sync._audit('add_product', name, NULL, to_jsonb(p) || jsonb_build_object('target', t.name));
    IF (SELECT login_expression FROM identity_sync._settings) IS NULL THEN
        RAISE NOTICE 'nobody can request product "%" yet: no login expression is set', name
            USING HINT = 'Map persons to their roles with identity_sync.set_login(), e.g. ''emp_'' || person.emp_no::text.';
    END IF;
END
$$;

-- NULL arguments mean "unchanged"; valid_for => '0' removes the limit. Changed groups apply to
-- every approved request at once; a changed valid_for applies to approvals from now on.
CREATE FUNCTION identity_sync.alter_product(name text, groups text[] DEFAULT NULL, owners text DEFAULT NULL,
                                            approval text DEFAULT NULL, valid_for interval DEFAULT NULL,
                                            description text DEFAULT NULL, new_name text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old identity_sync.product := identity_sync._product(name);
    n identity_sync.product;
BEGIN
    IF owners IS NOT NULL THEN
        PERFORM identity_sync._check_owners(owners);
    END IF;
    IF new_name IS NOT NULL AND (btrim(new_name) = '' OR EXISTS (SELECT FROM identity_sync.product WHERE product.name = new_name AND product.id <> old.id)) THEN
        RAISE EXCEPTION 'product "%" already exists or the name is empty', new_name USING ERRCODE = 'duplicate_object';
    END IF;
    UPDATE identity_sync.product
       SET groups = CASE WHEN alter_product.groups IS NULL THEN product.groups ELSE identity_sync._check_groups(alter_product.groups) END,
           owners = coalesce(alter_product.owners, product.owners),
           approval = CASE WHEN alter_product.approval IS NULL THEN product.approval ELSE identity_sync._check_approval(alter_product.approval) END,
           valid_for = CASE WHEN alter_product.valid_for IS NULL THEN product.valid_for
                            WHEN alter_product.valid_for = interval '0' THEN NULL
                            ELSE identity_sync._check_valid_for(alter_product.valid_for) END,
           description = coalesce(alter_product.description, product.description),
           name = coalesce(new_name, product.name),
           updated_at = now()
     WHERE id = old.id RETURNING * INTO n;
    IF n.groups IS DISTINCT FROM old.groups THEN
        PERFORM identity_sync._replan(ARRAY(SELECT DISTINCT r.person_key FROM identity_sync.request r
                                              WHERE r.product_id = n.id AND r.state = 'approved'), 'alter_product');
    END IF;
    PERFORM identity_sync._audit('alter_product', n.name, to_jsonb(old), to_jsonb(n));
END
$$;

-- Drop a product: its approved grants are revoked, its requests and decisions removed (the
-- audit log keeps their story).
CREATE FUNCTION identity_sync.drop_product(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.product := identity_sync._product(name);
    holders text[];
BEGIN
    holders := ARRAY(SELECT DISTINCT r.person_key FROM identity_sync.request r
                      WHERE r.product_id = p.id AND r.state = 'approved');
    DELETE FROM identity_sync.product WHERE id = p.id;
    PERFORM identity_sync._replan(holders, 'drop_product');
    PERFORM identity_sync._audit('drop_product', name, to_jsonb(p), jsonb_build_object('revoked_from', to_jsonb(holders)));
END
$$;

------------------------------------------------------------------------------------------------
-- Requests and decisions
------------------------------------------------------------------------------------------------

-- Self-service audit rows: the actor is the calling role (also under SET ROLE).
CREATE FUNCTION identity_sync._audit_request(action text, r identity_sync.request, extra jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._audit (actor, action, object, new)
    SELECT CASE WHEN action = 'expire' THEN 'identity_sync' ELSE identity_sync._caller() END,
           action, 'request ' || r.id,
           jsonb_build_object('request_id', r.id, 'product', p.name, 'person', r.person_key, 'state', r.state)
           || CASE WHEN identity_sync._caller() <> session_user AND action <> 'expire'
                   THEN jsonb_build_object('session_user', session_user::text) ELSE '{}' END
           || coalesce(extra, '{}')
      FROM identity_sync.product p WHERE p.id = r.product_id
$$;

CREATE FUNCTION identity_sync.request_access(product text, reason text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    p identity_sync.product := identity_sync._product(product);
    t identity_sync.target;
    existing identity_sync.request;
    r identity_sync.request;
BEGIN
    PERFORM identity_sync._expire_grants();   -- an expired grant must not block a new request
    SELECT * INTO existing FROM identity_sync.request x
     WHERE x.product_id = p.id AND x.person_key = me AND x.state IN ('pending', 'approved');
    IF existing.id IS NOT NULL THEN
        RAISE EXCEPTION 'you already have request % for product "%"', existing.id, p.name
            USING ERRCODE = 'duplicate_object', DETAIL = format('It is %s.', existing.state),
                  HINT = 'See identity_sync.my_requests; withdraw a pending request with identity_sync.revoke().';
    END IF;
    IF cardinality(identity_sync._owners(p, me)) = 0 THEN
        RAISE EXCEPTION 'nobody can approve product "%" for you', p.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'No active person other than you is an owner of the product for you today.',
                  HINT = 'The owners follow HR data (for example the manager of your department); ask an administrator.';
    END IF;
    BEGIN
        INSERT INTO identity_sync.request (product_id, person_key, requested_by, reason, requested_at)
        VALUES (p.id, me, identity_sync._caller(), reason, identity_sync._now())
        RETURNING * INTO r;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'you already have an open request for product "%"', p.name
            USING ERRCODE = 'duplicate_object', HINT = 'See identity_sync.my_requests.';
    END;
    PERFORM identity_sync._audit_request('request_access', r, jsonb_build_object('reason', reason));
    SELECT * INTO t FROM identity_sync.target WHERE id = p.target_id;
    IF NOT EXISTS (SELECT FROM identity_sync.account a WHERE a.target_id = t.id AND a.person_key = me
                      AND a.planned_state IN ('active', 'disabled')) THEN
        RAISE NOTICE 'you have no account in "%" yet', t.name
            USING DETAIL = 'Once approved, the groups are granted when you have one.';
    END IF;
    RETURN r.id;
END
$$;

-- The request, locked, after checking that the caller may decide it now. Self-approval and
-- non-owners are refused before the request's state is revealed.
CREATE FUNCTION identity_sync._decidable(request_id bigint, me text, verb text)
RETURNS identity_sync.request LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request;
    p identity_sync.product;
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id FOR UPDATE;
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'request % does not exist', request_id USING ERRCODE = 'undefined_object',
            HINT = 'identity_sync.my_approvals lists the requests you can decide.';
    END IF;
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    IF r.person_key = me THEN
        RAISE EXCEPTION 'you cannot % your own request', verb USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('Request %s is your request for product "%s".', r.id, p.name),
            HINT = 'A current owner of the product decides it.';
    END IF;
    IF NOT me = ANY (identity_sync._owners(p, r.person_key, ARRAY[me])) THEN
        RAISE EXCEPTION 'permission denied to % request %', verb, r.id USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('You (person %s) are not an owner of product "%s" for person %s today.', me, p.name, r.person_key),
            HINT = 'Owners follow HR data and are computed when deciding; identity_sync.my_approvals lists the requests you can decide.';
    END IF;
    IF r.state <> 'pending' THEN
        RAISE EXCEPTION 'request % is already %', r.id, r.state USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF EXISTS (SELECT FROM identity_sync.decision d WHERE d.request_id = r.id AND d.person_key = me) THEN
        RAISE EXCEPTION 'you have already decided request %', r.id USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'With approval "all" it waits for the other current owners.';
    END IF;
    RETURN r;
END
$$;

CREATE FUNCTION identity_sync.approve(request_id bigint, comment text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    r identity_sync.request := identity_sync._decidable(request_id, me, 'approve');
    p identity_sync.product;
    waiting text[];
BEGIN
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    INSERT INTO identity_sync.decision (request_id, person_key, decided_by, requester, decision, comment, at)
    VALUES (r.id, me, identity_sync._caller(), r.person_key, 'approve', comment, identity_sync._now());
    PERFORM identity_sync._forget_decidable();
    IF p.approval = 'all' THEN
        -- Every current owner must have approved; owners who are no longer owners do not count.
        waiting := ARRAY(SELECT o FROM unnest(identity_sync._owners(p, r.person_key)) AS o
                          WHERE NOT EXISTS (SELECT FROM identity_sync.decision d
                                             WHERE d.request_id = r.id AND d.person_key = o AND d.decision = 'approve')
                          ORDER BY o);
    END IF;
    UPDATE identity_sync.request x
       SET approvals = x.approvals + 1,
           state = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN 'approved' ELSE 'pending' END,
           decided_at = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN identity_sync._now() END,
           expires_at = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN identity_sync._now() + p.valid_for END
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request('approve', r, jsonb_build_object('approver', me, 'comment', comment)
                                                       || CASE WHEN r.expires_at IS NOT NULL THEN jsonb_build_object('expires_at', r.expires_at) ELSE '{}' END
                                                       || CASE WHEN cardinality(waiting) > 0 THEN jsonb_build_object('waiting_for', waiting) ELSE '{}' END);
    IF r.state = 'approved' THEN
        PERFORM identity_sync._replan(ARRAY[r.person_key], 'approve');
    ELSE
        RAISE NOTICE 'request % waits for % more owner(s)', r.id, cardinality(waiting)
            USING DETAIL = 'Product "' || p.name || '" needs the approval of every current owner.';
    END IF;
    RETURN r.state;
END
$$;

CREATE FUNCTION identity_sync.deny(request_id bigint, comment text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    r identity_sync.request := identity_sync._decidable(request_id, me, 'deny');
BEGIN
    INSERT INTO identity_sync.decision (request_id, person_key, decided_by, requester, decision, comment, at)
    VALUES (r.id, me, identity_sync._caller(), r.person_key, 'deny', comment, identity_sync._now());
    PERFORM identity_sync._forget_decidable();
    UPDATE identity_sync.request x SET state = 'denied', decided_at = identity_sync._now()
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request('deny', r, jsonb_build_object('approver', me, 'comment', comment));
    RETURN r.state;
END
$$;

-- Revoke an approved grant, or withdraw a pending request. Allowed to the requester, to a
-- current owner of the product for the requester, and to identity_sync_admin.
CREATE FUNCTION identity_sync.revoke(request_id bigint)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._caller();
    admin boolean := pg_has_role(role, 'identity_sync_admin', 'USAGE');
    me text := CASE WHEN admin THEN identity_sync.current_person() ELSE identity_sync._me() END;
    r identity_sync.request;
    p identity_sync.product;
    was text;
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id FOR UPDATE;
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'request % does not exist', request_id USING ERRCODE = 'undefined_object',
            HINT = 'identity_sync.my_requests lists your requests.';
    END IF;
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    IF NOT (admin OR r.person_key = me OR me = ANY (identity_sync._owners(p, r.person_key, ARRAY[me]))) THEN
        RAISE EXCEPTION 'permission denied to revoke request %', r.id USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('It is not your request, and you (person %s) are not an owner of product "%s" for person %s today.',
                            me, p.name, r.person_key),
            HINT = 'The requester, a current owner of the product or an identity_sync_admin can revoke it.';
    END IF;
    IF r.state NOT IN ('pending', 'approved') THEN
        RAISE EXCEPTION 'request % is already %', r.id, r.state USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    was := r.state;
    PERFORM identity_sync._forget_decidable();
    UPDATE identity_sync.request x
       SET state = CASE WHEN x.state = 'pending' AND x.person_key IS NOT DISTINCT FROM me THEN 'withdrawn' ELSE 'revoked' END,
           ended_at = identity_sync._now(), ended_by = role
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request(CASE WHEN r.state = 'withdrawn' THEN 'withdraw' ELSE 'revoke' END, r,
                                         jsonb_build_object('was', was));
    IF was = 'approved' THEN
        PERFORM identity_sync._replan(ARRAY[r.person_key], 'revoke');
    END IF;
    RETURN r.state;
END
$$;

-- Approved grants past their validity expire; the planner then revokes their groups. Called by
-- the worker on every tick (and before a new request, so an expired grant never blocks it).
CREATE FUNCTION identity_sync._expire_grants() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request;
    keys text[] := '{}';
BEGIN
    FOR r IN UPDATE identity_sync.request x SET state = 'expired', ended_at = x.expires_at, ended_by = 'identity_sync'
              WHERE x.state = 'approved' AND x.expires_at <= identity_sync._now()
              RETURNING * LOOP
        PERFORM identity_sync._audit_request('expire', r, jsonb_build_object('expires_at', r.expires_at));
        keys := keys || r.person_key;
    END LOOP;
    PERFORM identity_sync._replan(ARRAY(SELECT DISTINCT k FROM unnest(keys) AS k), 'expire');
    RETURN cardinality(keys);
END
$$;

-- Groups of approved, unexpired requests of a person in a target, for the planner. Withheld
-- while the person's account is not enabled (before the start, after leaving).
-- No SET clause, so that the planner's diff inlines it (it runs for every planned person); every
-- name in it is schema-qualified.
CREATE OR REPLACE FUNCTION identity_sync._granted_groups(target_id int, person_key text, enabled boolean)
RETURNS text[] LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN enabled THEN ARRAY(
        SELECT DISTINCT g
          FROM identity_sync.request r
          JOIN identity_sync.product p ON p.id = r.product_id
         CROSS JOIN LATERAL unnest(p.groups) AS g
         WHERE r.person_key = _granted_groups.person_key AND p.target_id = _granted_groups.target_id
           AND r.state = 'approved' AND (r.expires_at IS NULL OR r.expires_at > identity_sync._now())
         ORDER BY g) ELSE '{}'::text[] END
$$;

------------------------------------------------------------------------------------------------
-- What each login sees
------------------------------------------------------------------------------------------------

-- The pending requests `role` can decide now: its person is a current owner for the requester,
-- it is not the requester and has not decided yet. One owners query per product with pending
-- requests, remembered until the statement ends (src/selfservice.rs).
CREATE FUNCTION identity_sync._decidable_ids(role text) RETURNS bigint[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ids bigint[] := identity_sync._remembered_decidable(role);
    me text;
    p identity_sync.product;
    waiting text[];
BEGIN
    IF ids IS NOT NULL THEN
        RETURN ids;
    END IF;
    ids := '{}';
    me := identity_sync._person_of_role(role);
    IF me IS NOT NULL THEN
        FOR p IN SELECT * FROM identity_sync.product x
                  WHERE EXISTS (SELECT FROM identity_sync.request r
                                 WHERE r.product_id = x.id AND r.state = 'pending' AND r.person_key <> me) LOOP
            waiting := ARRAY(SELECT DISTINCT r.person_key FROM identity_sync.request r
                           WHERE r.product_id = p.id AND r.state = 'pending' AND r.person_key <> me
                             AND NOT EXISTS (SELECT FROM identity_sync.decision d
                                              WHERE d.request_id = r.id AND d.person_key = me));
            CONTINUE WHEN cardinality(waiting) = 0;
            ids := ids || ARRAY(
                SELECT r.id FROM identity_sync.request r
                 WHERE r.product_id = p.id AND r.state = 'pending' AND r.person_key <> me
                   AND NOT EXISTS (SELECT FROM identity_sync.decision d WHERE d.request_id = r.id AND d.person_key = me)
                   AND r.person_key IN (SELECT o.requester FROM identity_sync._owner_pairs(p, waiting, ARRAY[me]) AS o));
        END LOOP;
    END IF;
    PERFORM identity_sync._remember_decidable(role, ids);
    RETURN ids;
END
$$;

-- Can the caller approve or deny this request now (a current owner, not the requester, not
-- decided yet)?
CREATE FUNCTION identity_sync.can_approve(request_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(request_id = ANY (identity_sync._decidable_ids(identity_sync._caller())), false);
END
$$;

-- Where the grant of a request stands in its target: awaiting approval, not granted, no
-- account, withheld, pending, granted, failed, removing, kept, removed.
CREATE FUNCTION identity_sync._grant_status(request_id bigint, OUT status text, OUT detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request;
    p identity_sync.product;
    t identity_sync.target;
    a identity_sync.account;
    e identity_sync.event;
    still text[];
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id;
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    SELECT * INTO t FROM identity_sync.target WHERE id = p.target_id;
    SELECT * INTO a FROM identity_sync.account WHERE target_id = t.id AND person_key = r.person_key;
    IF r.state = 'pending' THEN
        status := 'awaiting approval';
        detail := CASE WHEN p.approval = 'all'
                       THEN format('every current owner must approve; %s approval(s) so far', r.approvals)
                       ELSE 'one current owner must approve' END;
    ELSIF r.state IN ('denied', 'withdrawn') THEN
        status := 'not granted';
    ELSIF r.state = 'approved' AND (r.expires_at IS NULL OR r.expires_at > identity_sync._now()) THEN
        SELECT * INTO e FROM identity_sync.event x
         WHERE x.target_id = t.id AND x.person_key = r.person_key AND x.state IN ('failed', 'retry')
           AND (x.kind = 'create' OR (x.kind = 'grant' AND x.payload->>'group' = ANY (p.groups)))
         ORDER BY x.seq LIMIT 1;
        IF a.person_key IS NULL OR a.planned_state = 'deleted' THEN
            status := 'no account';
            detail := format('no account in "%s": no rule of the target matches the person', t.name);
        ELSIF a.planned_state = 'disabled' AND NOT p.groups <@ a.planned_groups THEN
            status := 'withheld';
            detail := format('the account in "%s" is disabled', t.name);
        ELSIF p.groups <@ a.groups THEN
            status := 'granted';
            detail := format('member of %s in "%s"', array_to_string(p.groups, ', '), t.name);
        ELSIF e.state = 'failed' THEN
            status := 'failed';
            detail := format('event %s (%s) failed: %s', e.id, e.kind, e.last_error);
        ELSE
            status := 'pending';
            detail := format('being granted in "%s"', t.name)
                      || CASE WHEN e.state = 'retry' THEN format('; retrying: %s', e.last_error) ELSE '' END;
        END IF;
    ELSE
        still := ARRAY(SELECT g FROM unnest(p.groups) AS g WHERE g = ANY (coalesce(a.groups, '{}')) ORDER BY g);
        IF cardinality(still) = 0 THEN
            status := 'removed';
        ELSIF still <@ a.planned_groups THEN
            status := 'kept';
            detail := format('%s still granted by a rule or another request', array_to_string(still, ', '));
        ELSE
            SELECT * INTO e FROM identity_sync.event x
             WHERE x.target_id = t.id AND x.person_key = r.person_key AND x.state = 'failed'
               AND x.kind = 'revoke' AND x.payload->>'group' = ANY (still)
             ORDER BY x.seq LIMIT 1;
            status := CASE WHEN e.id IS NULL THEN 'removing' ELSE 'failed' END;
            detail := CASE WHEN e.id IS NULL THEN format('being removed from "%s"', t.name)
                           ELSE format('event %s (revoke) failed: %s', e.id, e.last_error) END;
        END IF;
    END IF;
END
$$;

-- The grant status of a request the caller may see (its own, one it can decide or decided, or
-- any for identity_sync_reader); no row otherwise.
CREATE FUNCTION identity_sync.grant_status(request_id bigint, OUT status text, OUT detail text)
RETURNS SETOF record LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._caller();
    me text;
    r identity_sync.request;
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id;
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    IF NOT pg_has_role(role, 'identity_sync_reader', 'USAGE') THEN
        me := identity_sync._person_of_role(role);
        IF me IS NULL OR NOT (r.person_key = me
                              OR EXISTS (SELECT FROM identity_sync.decision d WHERE d.request_id = r.id AND d.person_key = me)
                              OR r.id = ANY (identity_sync._decidable_ids(role))) THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM identity_sync._grant_status(r.id);
END
$$;

-- Row-level security: a login reads its own requests, the ones it can decide now and the ones
-- it decided; decisions are read by their owner and by the requester. Readers read everything.
-- Nobody but the extension's functions writes (PUBLIC has SELECT only).
ALTER TABLE identity_sync.request ENABLE ROW LEVEL SECURITY;
ALTER TABLE identity_sync.decision ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_requests ON identity_sync.request FOR SELECT TO PUBLIC
    USING (person_key = (SELECT identity_sync.current_person())
           OR EXISTS (SELECT FROM identity_sync.decision d
                       WHERE d.request_id = request.id AND d.person_key = (SELECT identity_sync.current_person()))
           OR (state = 'pending' AND identity_sync.can_approve(id)));
CREATE POLICY readers ON identity_sync.request FOR SELECT TO identity_sync_reader USING (true);
CREATE POLICY own_decisions ON identity_sync.decision FOR SELECT TO PUBLIC
    USING (person_key = (SELECT identity_sync.current_person())
           OR requester = (SELECT identity_sync.current_person()));
CREATE POLICY readers ON identity_sync.decision FOR SELECT TO identity_sync_reader USING (true);

-- The catalog: what can be requested (the owners condition is not shown).
CREATE VIEW identity_sync.products AS
SELECT p.name AS product, t.name AS target, p.groups, p.approval, p.valid_for, p.description
  FROM identity_sync.product p JOIN identity_sync.target t ON t.id = p.target_id;

CREATE VIEW identity_sync.my_requests WITH (security_invoker = true) AS
SELECT r.id AS request_id, p.name AS product, t.name AS target, p.groups, r.reason, r.state,
       r.requested_at, r.decided_at, r.expires_at, r.ended_at, r.ended_by,
       (SELECT jsonb_agg(jsonb_build_object('by', d.person_key, 'decision', d.decision, 'comment', d.comment, 'at', d.at)
                         ORDER BY d.at)
          FROM identity_sync.decision d WHERE d.request_id = r.id) AS decisions,
       g.status AS grant_status, g.detail AS grant_detail
  FROM identity_sync.request r
  JOIN identity_sync.product p ON p.id = r.product_id
  JOIN identity_sync.target t ON t.id = p.target_id
  LEFT JOIN LATERAL identity_sync.grant_status(r.id) AS g ON true
 WHERE r.person_key = (SELECT identity_sync.current_person());

CREATE VIEW identity_sync.my_approvals WITH (security_invoker = true) AS
SELECT r.id AS request_id, p.name AS product, t.name AS target, p.groups, p.approval,
       r.person_key AS requester, r.requested_by AS requester_role, r.reason, r.state, r.requested_at,
       r.approvals, d.decision IS NULL AS can_decide, d.decision AS my_decision, d.comment AS my_comment,
       d.at AS my_decided_at, r.decided_at, r.expires_at, r.ended_at,
       g.status AS grant_status, g.detail AS grant_detail
  FROM identity_sync.request r
  JOIN identity_sync.product p ON p.id = r.product_id
  JOIN identity_sync.target t ON t.id = p.target_id
  LEFT JOIN identity_sync.decision d ON d.request_id = r.id AND d.person_key = (SELECT identity_sync.current_person())
  LEFT JOIN LATERAL identity_sync.grant_status(r.id) AS g ON true
 WHERE d.request_id IS NOT NULL
    OR (r.state = 'pending' AND identity_sync.can_approve(r.id));

-- Everything, for operators and auditors.
CREATE VIEW identity_sync.requests AS
SELECT r.id AS request_id, p.name AS product, t.name AS target, p.groups, r.person_key, r.requested_by,
       r.reason, r.state, r.approvals, r.requested_at, r.decided_at, r.expires_at, r.ended_at, r.ended_by,
       (SELECT jsonb_agg(jsonb_build_object('by', d.person_key, 'role', d.decided_by, 'decision', d.decision,
                                            'comment', d.comment, 'at', d.at) ORDER BY d.at)
          FROM identity_sync.decision d WHERE d.request_id = r.id) AS decisions,
       g.status AS grant_status, g.detail AS grant_detail
  FROM identity_sync.request r
  JOIN identity_sync.product p ON p.id = r.product_id
  JOIN identity_sync.target t ON t.id = p.target_id
  LEFT JOIN LATERAL identity_sync._grant_status(r.id) AS g ON true;

COMMENT ON TABLE identity_sync.product IS 'Self-service products: groups in a target that persons can request, approved by owners computed from HR data.';
COMMENT ON COLUMN identity_sync.product.owners IS 'SQL condition over owner (candidate person row), requester, requester_contract, owner_contract and today; owners are active persons other than the requester.';
COMMENT ON COLUMN identity_sync.product.approval IS 'any: one current owner approves; all: every current owner approves.';
COMMENT ON COLUMN identity_sync.product.valid_for IS 'How long an approved grant lasts before the worker expires it; NULL = until revoked.';
COMMENT ON TABLE identity_sync.request IS 'Self-service requests (row-level security: a login reads its own, the ones it can decide and the ones it decided).';
COMMENT ON COLUMN identity_sync.request.state IS 'pending, approved, denied, withdrawn (by the requester while pending), revoked, expired.';
COMMENT ON TABLE identity_sync.decision IS 'Approvals and denials of requests by owners (row-level security: read by the owner and the requester).';
COMMENT ON VIEW identity_sync.products IS 'What can be requested: product, target, groups, approval mode, validity, description.';
COMMENT ON VIEW identity_sync.my_requests IS 'The calling login''s own requests, their decisions and where each grant stands in its target.';
COMMENT ON COLUMN identity_sync.my_requests.grant_status IS 'awaiting approval, not granted, no account, withheld, pending, granted, failed, removing, kept, removed.';
COMMENT ON VIEW identity_sync.my_approvals IS 'Requests the calling login can decide now (can_decide) and the ones it decided.';
COMMENT ON COLUMN identity_sync.my_approvals.can_decide IS 'True when the login is a current owner and has not decided yet: call approve() or deny().';
COMMENT ON VIEW identity_sync.requests IS 'Every self-service request with its decisions and grant status, for operators and auditors.';
COMMENT ON FUNCTION identity_sync.set_login(text) IS 'SQL over person giving each person''s PostgreSQL role name (e.g. ''emp_'' || person.emp_no::text), so a login knows which person it is; NULL disables self-service.';
COMMENT ON FUNCTION identity_sync.current_person() IS 'The person key of the calling login (session_user, or the role set with SET ROLE), by the login expression; NULL when none.';
COMMENT ON FUNCTION identity_sync.add_product(text, text, text[], text, text, interval, text) IS 'Add a product: groups in a target, owners (SQL condition over owner, requester, requester_contract), approval any or all, valid_for, description.';
COMMENT ON FUNCTION identity_sync.alter_product(text, text[], text, text, interval, text, text) IS 'Change a product: NULL means unchanged; valid_for => ''0'' removes the limit; new groups apply to every approved request.';
COMMENT ON FUNCTION identity_sync.drop_product(text) IS 'Drop a product: its approved grants are revoked, its requests removed (the audit log keeps them).';
COMMENT ON FUNCTION identity_sync.request_access(text, text) IS 'Request a product for yourself, with a reason; returns the request id. An owner of the product decides it.';
COMMENT ON FUNCTION identity_sync.approve(bigint, text) IS 'Approve a request as a current owner of its product (never your own); returns the request''s state.';
COMMENT ON FUNCTION identity_sync.deny(bigint, text) IS 'Deny a request as a current owner of its product (never your own); returns the request''s state.';
COMMENT ON FUNCTION identity_sync.revoke(bigint) IS 'End an approved grant (or withdraw your pending request): by the requester, a current owner or identity_sync_admin.';
COMMENT ON FUNCTION identity_sync.can_approve(bigint) IS 'Whether the calling login can approve or deny this request now.';
COMMENT ON FUNCTION identity_sync.grant_status(bigint) IS 'Where the grant of a request you may see stands in its target, with detail.';

-- Products, requests and decisions survive pg_dump / pg_restore like the rest of the
-- configuration (see finalize.sql); one statement each.
SELECT pg_catalog.pg_extension_config_dump('identity_sync.product', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.request', '');
SELECT pg_catalog.pg_extension_config_dump('identity_sync.decision', '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.product', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_get_serial_sequence('identity_sync.request', 'id')::regclass, '');
