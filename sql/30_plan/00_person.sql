-- The person document: the person row, all contracts, the primary contract and activity on a
-- day, as the names person, contract, contracts, today and iteration that mapping expressions,
-- rules and person() see.
--
-- Planning, in the files of 30_plan/ (in load order): the person document (here) -> the compiled
-- mapping + rules query per target (10_compile) -> desired state of a batch of persons
-- (20_desired) -> diff against the account registry (30_diff) -> thresholds (40_thresholds) ->
-- events and planned state (60_plan). 50_apply applies a delivered event to the registry.

-- ORDER BY choosing the primary contract (person document, self-service owners): the configured
-- one (set_primary_contract) or the default, active first, then latest end, then latest start.
CREATE FUNCTION identity_sync._primary_contract_order() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT primary_contract_order FROM identity_sync._settings), format(
        '(contract.%1$I <= today AND (contract.%2$I IS NULL OR contract.%2$I >= today)) DESC, contract.%2$I DESC NULLS FIRST, contract.%1$I DESC',
        c.starts_column, c.ends_column))
      FROM identity_sync._contract_source() AS c
$$;

-- SQL text of a condition: the person key of `alias` (a row of the person source) is one of the
-- keys in parameter $<param> (text[]), compared in the key column's own type so that its index
-- answers.
CREATE FUNCTION identity_sync._person_key_in(alias text, param int) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('%I.%I = ANY ($%s::text[]::%s[])', alias, p.key_column, param,
                  identity_sync._column_type(p.relation, p.key_column, 'person key'))
      FROM identity_sync._require_person_source() AS p
$$;

-- SQL text joining the primary contract of `person` (an alias of the person source) as `alias`
-- (person document: contract; self-service owners: requester_contract, owner_contract).
CREATE FUNCTION identity_sync._primary_contract_join(person text, alias text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('LEFT JOIN LATERAL (SELECT * FROM %s AS contract WHERE contract.%I = %I.%I ORDER BY %s LIMIT 1) AS %I ON true ',
                  c.relation, c.key_column, person, (identity_sync._person_source()).key_column,
                  identity_sync._primary_contract_order(), alias)
      FROM identity_sync._contract_source() AS c
$$;

-- SQL text of the FROM clause that binds the names person, contract, contracts, today and
-- iteration for one target (NULL: neutral lifecycle). $1 = keys (text[]), $2 = day, $3 = iteration.
CREATE FUNCTION identity_sync._from_clause(opts jsonb DEFAULT '{}')
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._require_person_source();
    c identity_sync.source := identity_sync._contract_source();
    create_before text := quote_literal(coalesce(opts->>'create_before', '0'));
    enable_before text := quote_literal(coalesce(opts->>'enable_before', '0'));
    disable_after text := quote_literal(coalesce(opts->>'disable_after', '0'));
    delete_after  text := CASE WHEN opts->>'delete_after' IS NULL THEN 'NULL' ELSE quote_literal(opts->>'delete_after') END;
    sql text;
BEGIN
    sql := format('FROM %s AS person CROSS JOIN LATERAL (SELECT $2::date AS today, $3::int AS iteration) AS _p ', p.relation);
    IF c.id IS NULL THEN
        sql := sql || 'CROSS JOIN LATERAL (SELECT NULL::record AS contract, NULL::record[] AS contracts, true AS _exists, true AS _enabled, true AS _creatable) AS _c ';
    ELSE
        sql := sql || format(
            'LEFT JOIN LATERAL (SELECT array_agg(c ORDER BY c.%2$I, c.%3$I) AS contracts, '
            || 'coalesce(bool_or(c.%2$I::date - %5$s::interval <= today AND (%8$s::interval IS NULL OR c.%3$I IS NULL OR today <= c.%3$I::date + %8$s::interval)), false) AS _exists, '
            || 'coalesce(bool_or(c.%2$I::date - %6$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %7$s::interval)), false) AS _enabled, '
            -- A new account only for a person who is (about to be) working: not for a leaver of
            -- years ago whom a first sync meets.
            || 'coalesce(bool_or(c.%2$I::date - %5$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %7$s::interval)), false) AS _creatable '
            || 'FROM %1$s AS c WHERE c.%4$I = person.%9$I) AS _cs ON true ',
            c.relation, c.starts_column, c.ends_column, c.key_column,
            create_before, enable_before, disable_after, delete_after, p.key_column)
            || identity_sync._primary_contract_join('person', 'contract');
    END IF;
    RETURN sql || 'WHERE ' || identity_sync._person_key_in('person', 1);
END
$$;

CREATE FUNCTION identity_sync._person_key_expr() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('person.%I::text', (identity_sync._person_source()).key_column)
$$;

-- A person key given by a user (person(), preview()): not null, and of the person key column's
-- type (so that the error names the key, not a cast inside a query of ours).
CREATE FUNCTION identity_sync._check_person_key(person_key text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
    keytype regtype;
BEGIN
    PERFORM identity_sync._not_null(person_key, 'the person key');
    IF p.id IS NULL THEN
        RETURN;   -- _from_clause says what is missing
    END IF;
    keytype := identity_sync._column_type(p.relation, p.key_column, 'person key');
    BEGIN
        EXECUTE format('SELECT $1::%s', keytype) USING person_key;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'invalid person key "%"', person_key USING ERRCODE = 'invalid_text_representation',
            DETAIL = format('The person key column %I of %s is of type %s.', p.key_column, p.relation, keytype);
    END;
END
$$;

CREATE FUNCTION identity_sync.person(person_key text)
RETURNS jsonb LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    doc jsonb;
    has_contracts boolean := (identity_sync._contract_source()).id IS NOT NULL;
    q text;
BEGIN
    PERFORM identity_sync._check_person_key(person_key);
    q := format('SELECT jsonb_build_object(''person_key'', %s, ''person'', to_jsonb(person), '
                   '''contract'', %s, ''contracts'', %s, ''active'', %s, ''today'', today) %s',
                   identity_sync._person_key_expr(),
                   CASE WHEN has_contracts THEN 'CASE WHEN contract IS NULL THEN NULL ELSE to_jsonb(contract) END' ELSE 'NULL::jsonb' END,
                   CASE WHEN has_contracts THEN 'coalesce(to_jsonb(contracts), ''[]'')' ELSE '''[]''::jsonb' END,
                   CASE WHEN has_contracts THEN '_enabled' ELSE 'true' END,
                   identity_sync._from_clause());
    PERFORM identity_sync._use_user_search_path();
    -- As identity_sync.run_as, read-only (src/evaluate.rs): the sources may be views, and the
    -- primary contract order is user SQL.
    doc := identity_sync._evaluate(q, NULL::jsonb, ARRAY['person document'], ARRAY[person_key], identity_sync._today(), 0);
    RETURN doc;
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.person(text) TO identity_sync_operator;

COMMENT ON FUNCTION identity_sync.person(text) IS 'The person document: person row, contracts, primary contract, active today.';
