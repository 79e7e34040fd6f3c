-- Self-service products and their owners.

-- FROM clause binding owner (every person), requester (the person with key $1[1]),
-- requester_contract and owner_contract (their primary contracts) and today ($2).
CREATE FUNCTION identity_sync._owners_from(with_owner_contract boolean)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('FROM %1$s AS owner CROSS JOIN LATERAL (SELECT $2::date AS today) AS _p JOIN %1$s AS requester ON ',
                  (identity_sync._require_person_source()).relation) || identity_sync._person_key_in('requester', 1) || ' '
        || CASE WHEN (identity_sync._contract_source()).id IS NULL
                THEN 'CROSS JOIN LATERAL (SELECT NULL::record AS requester_contract, NULL::record AS owner_contract) AS _c '
                ELSE identity_sync._primary_contract_join('requester', 'requester_contract')
                     || CASE WHEN with_owner_contract THEN identity_sync._primary_contract_join('owner', 'owner_contract') ELSE '' END
           END
$$;

-- Check an owners condition: a boolean over owner, requester, requester_contract,
-- owner_contract and today; errors carry the position inside the condition.
CREATE FUNCTION identity_sync._check_owners(owners text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    typ regtype;
BEGIN
    PERFORM identity_sync._check_user_text('owners condition', owners,
        'For example: EXISTS (SELECT FROM dept_manager m WHERE m.emp_no = owner.emp_no AND m.dept_no = requester_contract.dept_no AND today BETWEEN m.from_date AND m.to_date)');
    typ := identity_sync._probe_user_expression('owners condition', owners, identity_sync._owners_from(true), ' WHERE');
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
    sql text;
    pairs text[];
BEGIN
    sql := format('SELECT DISTINCT requester.%1$I::text AS r, owner.%1$I::text AS o %2$s WHERE owner.%1$I::text <> requester.%1$I::text ',
                  ps.key_column, identity_sync._owners_from(p.owners ~* '\mowner_contract\M'));
    IF candidates IS NOT NULL THEN
        sql := sql || 'AND ' || identity_sync._person_key_in('owner', 4) || ' ';
    END IF;
    IF c.id IS NOT NULL THEN
        sql := sql || format('AND EXISTS (SELECT FROM %1$s AS c WHERE c.%2$I = owner.%3$I AND c.%4$I::date <= today '
                             'AND (c.%5$I IS NULL OR c.%5$I::date >= today)) ',
                             c.relation, c.key_column, ps.key_column, c.starts_column, c.ends_column);
    END IF;
    sql := sql || 'AND (' || p.owners || E'\n)';
    -- As identity_sync.run_as, read-only, bounded (src/evaluate.rs); the pairs come back as a
    -- two-dimensional array.
    PERFORM identity_sync._use_user_search_path();
    pairs := identity_sync._evaluate(
        format('SELECT coalesce(array_agg(ARRAY[x.r, x.o]), ''{}'') FROM (%s) AS x', sql),
        NULL::text[], ARRAY[format('owners condition of product "%s"', p.name)],
        requesters, identity_sync._today(), a4 => candidates);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    RETURN QUERY SELECT pairs[i][1], pairs[i][2] FROM generate_subscripts(pairs, 1) AS i;
END
$$;

-- The current owners of product `p` for the person `requester` (among `candidates`, if given).
CREATE FUNCTION identity_sync._owners(p identity_sync.product, requester text, candidates text[] DEFAULT NULL)
RETURNS text[] LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY(SELECT o.owner FROM identity_sync._owner_pairs(p, ARRAY[requester], candidates) AS o ORDER BY 1)
$$;

CREATE FUNCTION identity_sync._product(name text) RETURNS identity_sync.product
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._by_name(NULL::identity_sync.product, name, 'There are no products yet.')
$$;

-- Check what a product grants and how (add_product, alter_product): its groups, its approval
-- mode and how long a grant lasts. Returns the groups sorted and distinct.
CREATE FUNCTION identity_sync._check_product(groups text[], approval text, valid_for interval) RETURNS text[]
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
    IF approval IS NULL OR approval NOT IN ('any', 'all') THEN
        RAISE EXCEPTION 'invalid approval "%"', approval USING ERRCODE = 'invalid_parameter_value',
            HINT = 'any: one current owner approves; all: every current owner approves.';
    END IF;
    IF valid_for IS NOT NULL AND valid_for <= interval '0' THEN
        RAISE EXCEPTION 'valid_for must be positive, not %', valid_for USING ERRCODE = 'invalid_parameter_value',
            HINT = 'NULL means the grant lasts until it is revoked.';
    END IF;
    RETURN ARRAY(SELECT DISTINCT g FROM unnest(groups) AS g ORDER BY g);
END
$$;

CREATE FUNCTION identity_sync.add_product(name text, target text, groups text[], owners text,
                                          approval text DEFAULT 'any', valid_for interval DEFAULT NULL,
                                          description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    g text[] := identity_sync._check_product(groups, approval, valid_for);
    p identity_sync.product;
BEGIN
    PERFORM identity_sync._check_name('product', name, EXISTS (SELECT FROM identity_sync.product WHERE product.name = add_product.name),
                                      'Change it with identity_sync.alter_product(), or drop it first with identity_sync.drop_product().');
    PERFORM identity_sync._check_owners(owners);
    INSERT INTO identity_sync.product (name, target_id, groups, owners, approval, valid_for, description)
    VALUES (name, t.id, g, owners, approval, valid_for, description)
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
    IF new_name IS NOT NULL THEN
        PERFORM identity_sync._check_name('product', new_name, EXISTS (SELECT FROM identity_sync.product WHERE product.name = new_name AND product.id <> old.id),
                                          'Choose another name, or drop that product first.');
    END IF;
    UPDATE identity_sync.product
       SET groups = identity_sync._check_product(coalesce(alter_product.groups, product.groups),
                                                 coalesce(alter_product.approval, product.approval),
                                                 CASE WHEN alter_product.valid_for = interval '0' THEN NULL
                                                      ELSE coalesce(alter_product.valid_for, product.valid_for) END),
           owners = coalesce(alter_product.owners, product.owners),
           approval = coalesce(alter_product.approval, product.approval),
           valid_for = CASE WHEN alter_product.valid_for = interval '0' THEN NULL
                            ELSE coalesce(alter_product.valid_for, product.valid_for) END,
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

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.add_product(text, text, text[], text, text, interval, text),
                          identity_sync.alter_product(text, text[], text, text, interval, text, text),
                          identity_sync.drop_product(text)
   TO identity_sync_admin;

COMMENT ON FUNCTION identity_sync.add_product(text, text, text[], text, text, interval, text) IS 'Add a product: groups in a target, owners (SQL condition over owner, requester, requester_contract), approval any or all, valid_for, description.';
COMMENT ON FUNCTION identity_sync.alter_product(text, text[], text, text, interval, text, text) IS 'Change a product: NULL means unchanged; valid_for => ''0'' removes the limit; new groups apply to every approved request.';
COMMENT ON FUNCTION identity_sync.drop_product(text) IS 'Drop a product: its approved grants are revoked, its requests removed (the audit log keeps them).';
