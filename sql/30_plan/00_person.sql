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

-- SQL text of the aggregates over a person's contracts `c` (from `rel`, dates in the columns
-- starts and ends) that the lifecycle reads, for a target's intervals `opts`: contracts (as
-- `contracts_expr`), _exists, _enabled and _creatable (each also true when `also` is).
CREATE FUNCTION identity_sync._contract_aggregates(opts jsonb, contracts_expr text, starts name, ends name, also text)
RETURNS text LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format(
            'SELECT %1$s AS contracts, '
            || '(coalesce(bool_or(c.%2$I::date - %4$s::interval <= today AND (%7$s::interval IS NULL OR c.%3$I IS NULL OR today <= c.%3$I::date + %7$s::interval)), false) OR %8$s) AS _exists, '
            || '(coalesce(bool_or(c.%2$I::date - %5$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %6$s::interval)), false) OR %8$s) AS _enabled, '
            -- A new account only for a person who is (about to be) working: not for a leaver of
            -- years ago whom a first sync meets.
            || '(coalesce(bool_or(c.%2$I::date - %4$s::interval <= today AND (c.%3$I IS NULL OR today <= c.%3$I::date + %6$s::interval)), false) OR %8$s) AS _creatable ',
            contracts_expr, starts, ends,
            quote_literal(coalesce(opts->>'create_before', '0')), quote_literal(coalesce(opts->>'enable_before', '0')),
            quote_literal(coalesce(opts->>'disable_after', '0')),
            CASE WHEN opts->>'delete_after' IS NULL THEN 'NULL' ELSE quote_literal(opts->>'delete_after') END, also)
$$;

-- The FROM clause with several person sources (15_sources.sql): the person keys $1 with their
-- links $4 (_links_of); person is the record of the highest-priority
-- source (the sources' columns together, with source), persons every record (jsonb, highest
-- priority first, each with its source), contracts every contract of every source (jsonb, each
-- with its source), contract the primary one of them. A person one of whose records comes from
-- a source without contract source counts as working while that record is there.
CREATE FUNCTION identity_sync._from_clause_several(opts jsonb)
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c identity_sync.source := identity_sync._contract_source();
    recs text := identity_sync._records_sql('person', true);
    crecs text := identity_sync._records_sql('contract', true);
    pcols text := (SELECT string_agg(format('r.%I', u.col), ', ' ORDER BY u.n) FROM identity_sync._union_columns('person') AS u);
    ccols text := (SELECT string_agg(format('contract.%I', u.col), ', ' ORDER BY u.n) FROM identity_sync._union_columns('contract') AS u);
    sql text;
BEGIN
    PERFORM identity_sync._require_person_source();
    sql := format('FROM unnest($1::text[], $4::text[]) AS _k(person_key, _links) CROSS JOIN LATERAL (SELECT $2::date AS today, $3::int AS iteration) AS _p '
                  'CROSS JOIN LATERAL (SELECT r.source, %2$s FROM (%1$s) AS r ORDER BY r.priority DESC, r.source, r._key LIMIT 1) AS person '
                  'CROSS JOIN LATERAL (SELECT jsonb_agg(jsonb_build_object(''source'', r.source) || r._record ORDER BY r.priority DESC, r.source, r._key) AS persons, '
                  'bool_or(r._always) AS _always FROM (%1$s) AS r) AS _ps ',
                  recs, pcols);
    IF c.id IS NULL THEN
        sql := sql || 'CROSS JOIN LATERAL (SELECT NULL::record AS contract, ''[]''::jsonb AS contracts, true AS _exists, true AS _enabled, true AS _creatable) AS _c ';
    ELSE
        sql := sql || format('CROSS JOIN LATERAL (%s FROM (%s) AS c) AS _cs ',
                             identity_sync._contract_aggregates(opts,
                                 format('coalesce(jsonb_agg(jsonb_build_object(''source'', c.source) || c._record ORDER BY c.%1$I, c.%2$I, c.source), ''[]'')',
                                        c.starts_column, c.ends_column),
                                 c.starts_column, c.ends_column, 'coalesce(_ps._always, false)'), crecs)
            || format('LEFT JOIN LATERAL (SELECT contract.source, %s FROM (%s) AS contract ORDER BY %s LIMIT 1) AS contract ON true ',
                      ccols, crecs, identity_sync._primary_contract_order());
    END IF;
    RETURN sql || 'WHERE true';
END
$$;

-- SQL text of the FROM clause that binds the names person, contract, contracts, today and
-- iteration for one target (NULL: neutral lifecycle). $1 = keys (text[]), $2 = day, $3 = iteration;
-- with several person sources (_from_clause_several) also persons, and $4 = the links.
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
    IF identity_sync._several_sources() THEN
        RETURN identity_sync._from_clause_several(opts);
    END IF;
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
    SELECT CASE WHEN identity_sync._several_sources() THEN '_k.person_key'
                ELSE format('person.%I::text', (identity_sync._person_source()).key_column) END
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
    IF p.id IS NULL OR identity_sync._several_sources() THEN
        RETURN;   -- _from_clause says what is missing; with several sources keys are text
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
    several boolean := identity_sync._several_sources();
    q text;
BEGIN
    PERFORM identity_sync._check_person_key(person_key);
    q := format('SELECT jsonb_build_object(''person_key'', %s, ''person'', to_jsonb(person), %s'
                   '''contract'', %s, ''contracts'', %s, ''active'', %s, ''today'', today) %s',
                   identity_sync._person_key_expr(),
                   CASE WHEN several THEN '''persons'', persons, ' ELSE '' END,
                   CASE WHEN has_contracts THEN 'CASE WHEN contract IS NULL THEN NULL ELSE to_jsonb(contract) END' ELSE 'NULL::jsonb' END,
                   CASE WHEN has_contracts THEN 'coalesce(to_jsonb(contracts), ''[]'')' ELSE '''[]''::jsonb' END,
                   CASE WHEN has_contracts THEN '_enabled' ELSE 'true' END,
                   identity_sync._from_clause());
    PERFORM identity_sync._use_user_search_path();
    -- As identity_sync.run_as, read-only (src/evaluate.rs): the sources may be views, and the
    -- primary contract order is user SQL.
    doc := identity_sync._evaluate(q, NULL::jsonb, ARRAY['person document'], ARRAY[person_key], identity_sync._today(), 0,
                                   identity_sync._links_of(ARRAY[person_key]));
    RETURN doc;
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.person(text) TO identity_sync_operator;

COMMENT ON FUNCTION identity_sync.person(text) IS 'The person document: person row, contracts, primary contract, active today; with several sources also persons (every source''s record).';
