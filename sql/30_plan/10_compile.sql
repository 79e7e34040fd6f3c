-- Mappings and rules, compiled into one set-based query per target (target.compiled): given
-- $1 = person keys (text[]), $2 = the day, $3 = the iteration of unique attributes, it returns
-- one row per person with the columns _compiled_columns() names.

-- The columns of a compiled query, by name: _compile makes them and checks them, _desired
-- inserts them into pg_temp._is_desired by these names (never by position).
--   person_key text, rules text[] (matched rule names), groups text[] (of the matched rules),
--   attributes jsonb (attribute -> value), exists_now / enabled_now / creatable_now boolean (the
--   lifecycle of the person's contracts today, for the target's intervals).
CREATE FUNCTION identity_sync._compiled_columns() RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'person_key, rules, groups, attributes, exists_now, enabled_now, creatable_now'
$$;

-- A row of a compiled query, as _evaluate_compiled returns them (the same columns, in order).
CREATE TYPE identity_sync._desired_row AS (
    person_key text, rules text[], groups text[], attributes jsonb,
    exists_now boolean, enabled_now boolean, creatable_now boolean);

-- The user expressions of a target's compiled query, numbered as its markers are
-- (identity_sync._at(n) runs before expression n, src/evaluate.rs): rules by name, then
-- mappings by position. _compile builds the query from them; an error or timeout names them.
CREATE FUNCTION identity_sync._compiled_expressions(target_id int)
RETURNS TABLE (n int, kind text, name text, expression text, groups text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (row_number() OVER (ORDER BY x.k, x.rule_name, x.position))::int, x.kind, x.name, x.expression, x.groups
      FROM (SELECT 1 AS k, r.name AS rule_name, NULL::int AS position, 'rule' AS kind, r.name, r.condition AS expression, r.groups
              FROM identity_sync.rule r WHERE r.target_id = _compiled_expressions.target_id
            UNION ALL
            SELECT 2, NULL, m.position, 'mapping', m.attribute, m.expression, NULL
              FROM identity_sync.mapping m WHERE m.target_id = _compiled_expressions.target_id) AS x
$$;

-- Names of the compiled query's parts for _evaluate: [1] what runs between expressions (the
-- person document: sources, primary contract order), [n + 1] expression n.
CREATE FUNCTION identity_sync._compiled_names(target_id int) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY['person document'] || ARRAY(SELECT format('%s "%s"', e.kind, e.name)
                                               FROM identity_sync._compiled_expressions(target_id) AS e ORDER BY e.n)
$$;

-- One attribute of a compiled query: its name and its value, as jsonb_build_object's pair,
-- preceded by its marker n.
CREATE FUNCTION identity_sync._compiled_pair(attribute text, n int, expression text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format('%L, CASE WHEN identity_sync._at(%s) THEN to_jsonb((%s%s)) END', attribute, n, expression, E'\n')
$$;

CREATE FUNCTION identity_sync._compile(target_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
    conditions text[] := '{}';
    rules text[] := '{}';
    groups text := '';
    attrs text := '''{}''::jsonb';
    r record;
    pairs text[] := '{}';
    sql text;
BEGIN
    SELECT * INTO t FROM identity_sync.target WHERE id = target_id;
    IF (identity_sync._person_source()).id IS NULL THEN
        UPDATE identity_sync.target SET compiled = NULL WHERE id = target_id;
        RETURN;
    END IF;
    -- Each expression is preceded by its marker, so that an error or a timeout names it. A
    -- rule's condition is evaluated once per person (into _q._r), then read for its name and
    -- for its groups: written out for each, an EXISTS ran twice, and the planner chose a hash
    -- of the whole table for one of the two copies (bench/run: 12 ms of a 33 ms batch).
    FOR r IN SELECT * FROM identity_sync._compiled_expressions(t.id) ORDER BY n LOOP
        IF r.kind = 'rule' THEN
            conditions := conditions || format('CASE WHEN identity_sync._at(%s) THEN (%s%s) END',
                                               r.n, r.expression, E'\n');
            rules := rules || format('CASE WHEN _q._r[%s] THEN %L::text END', cardinality(conditions), r.name);
            groups := groups || format(' || CASE WHEN _q._r[%s] THEN %L::text[] END', cardinality(conditions), r.groups);
        ELSE
            pairs := pairs || identity_sync._compiled_pair(r.name, r.n, r.expression);
            IF cardinality(pairs) = 50 THEN
                attrs := attrs || ' || jsonb_build_object(' || array_to_string(pairs, ', ') || ')';
                pairs := '{}';
            END IF;
        END IF;
    END LOOP;
    IF cardinality(pairs) > 0 THEN
        attrs := attrs || ' || jsonb_build_object(' || array_to_string(pairs, ', ') || ')';
    END IF;
    -- The inner query evaluates every expression once per person (OFFSET 0: not pulled up,
    -- which would copy each condition into every place that reads it); its last column marks
    -- the row's expressions done (what runs until the next row's first expression is the
    -- person document).
    sql := format('SELECT _q.person_key, array_remove(ARRAY[%s]::text[], NULL) AS rules, '
                  'ARRAY(SELECT DISTINCT g FROM unnest(''{}''::text[]%s) AS g WHERE g IS NOT NULL ORDER BY g) AS groups, '
                  '_q.attributes, _q.exists_now, _q.enabled_now, _q.creatable_now '
                  'FROM (SELECT %s AS person_key, ARRAY[%s]::boolean[] AS _r, %s AS attributes, _exists AS exists_now, '
                  '_enabled AS enabled_now, CASE WHEN identity_sync._at(0) THEN _creatable END AS creatable_now ',
                  array_to_string(rules, ', '), groups,
                  identity_sync._person_key_expr(), array_to_string(conditions, ', '), attrs)
           || identity_sync._from_clause(t.options) || ' OFFSET 0) AS _q';
    -- Parse and plan it once now, as the worker will run it (_evaluate_compiled), so a broken
    -- configuration never reaches the worker.
    t.compiled := sql;
    PERFORM identity_sync._evaluate_compiled(t, '{}', CURRENT_DATE, 0);
    -- (unchanged text: no write, so recompiling after DDL on a source locks no target row; a
    -- target whose planning failed is tried again at once with a new configuration)
    UPDATE identity_sync.target
       SET compiled = sql, plan_retry_at = CASE WHEN plan_retry_at IS NOT NULL THEN now() END
     WHERE id = t.id AND compiled IS DISTINCT FROM sql;
END
$$;

-- A compiled query of target t that evaluates one mapped attribute alone (the other columns
-- NULL): the unique search of _desired tries the next iteration of a taken value with it,
-- without the rules and the other mappings (whose subqueries may cost as much for a few
-- persons as for a whole batch). Markers and names as in the target's compiled query.
CREATE FUNCTION identity_sync._compiled_attribute(t identity_sync.target, attribute text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('SELECT %s AS person_key, NULL::text[] AS rules, NULL::text[] AS groups, '
                  'jsonb_build_object(%s) AS attributes, NULL::boolean AS exists_now, NULL::boolean AS enabled_now, '
                  'CASE WHEN identity_sync._at(0) THEN NULL::boolean END AS creatable_now ',
                  identity_sync._person_key_expr(), identity_sync._compiled_pair(e.name, e.n, e.expression))
           || identity_sync._from_clause(t.options)
      FROM identity_sync._compiled_expressions(t.id) AS e
     WHERE e.kind = 'mapping' AND e.name = attribute
$$;

-- Evaluate target t's compiled query (or `compiled`, one of _compiled_attribute) for `keys` on
-- `today` at `iteration`: as the role of
-- identity_sync.run_as, read-only, bounded by the target's statement_timeout (src/evaluate.rs).
-- An error names the mapping or rule it came from.
CREATE FUNCTION identity_sync._evaluate_compiled(t identity_sync.target, keys text[], today date, iteration int,
                                                 compiled text DEFAULT NULL)
RETURNS identity_sync._desired_row[] LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._use_user_search_path();
    RETURN identity_sync._evaluate(
        format('SELECT coalesce(array_agg(ROW(%1$s)::identity_sync._desired_row), ''{}'') FROM (%2$s) AS q',
               identity_sync._compiled_columns(), coalesce(compiled, t.compiled)),
        NULL::identity_sync._desired_row[], identity_sync._compiled_names(t.id), keys, today, iteration,
        identity_sync._links_of(keys),
        timeout_ms => identity_sync._statement_timeout_ms(t.options),
        setting => identity_sync._statement_timeout_setting(t));
END
$$;

-- Which expression of target t fails before any of them runs (a permission check as the
-- executor starts, a function the planner folds): the first whose own check fails, or NULL.
CREATE FUNCTION identity_sync._blame(t identity_sync.target) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT * FROM identity_sync._compiled_expressions(t.id) ORDER BY n LOOP
        BEGIN
            PERFORM identity_sync._check_user_expression(t, e.expression, e.kind);
        EXCEPTION WHEN OTHERS THEN
            RETURN format('%s "%s"', e.kind, e.name);
        END;
    END LOOP;
    RETURN NULL;
END
$$;

-- After a change every target's query depends on (sources, primary contract, search_path).
CREATE FUNCTION identity_sync._recompile_all() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._compile(t.id) FROM identity_sync.target t ORDER BY t.id;
END
$$;
