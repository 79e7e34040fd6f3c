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

CREATE FUNCTION identity_sync._compile(target_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
    rules text := '''{}''::text[]';
    groups text := '''{}''::text[]';
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
    FOR r IN SELECT * FROM identity_sync.rule WHERE rule.target_id = t.id ORDER BY name LOOP
        rules := rules || format(' || CASE WHEN (%s%s) THEN %L::text END', r.condition, E'\n', r.name);
        groups := groups || format(' || CASE WHEN (%s%s) THEN %L::text[] END', r.condition, E'\n', r.groups);
    END LOOP;
    FOR r IN SELECT * FROM identity_sync.mapping WHERE mapping.target_id = t.id ORDER BY position LOOP
        pairs := pairs || format('%L, to_jsonb((%s%s))', r.attribute, r.expression, E'\n');
        IF cardinality(pairs) = 50 THEN
            attrs := attrs || ' || jsonb_build_object(' || array_to_string(pairs, ', ') || ')';
            pairs := '{}';
        END IF;
    END LOOP;
    IF cardinality(pairs) > 0 THEN
        attrs := attrs || ' || jsonb_build_object(' || array_to_string(pairs, ', ') || ')';
    END IF;
    sql := format('SELECT %s AS person_key, array_remove(%s, NULL) AS rules, '
                  'ARRAY(SELECT DISTINCT g FROM unnest(%s) AS g WHERE g IS NOT NULL ORDER BY g) AS groups, '
                  '%s AS attributes, _exists AS exists_now, _enabled AS enabled_now, _creatable AS creatable_now ',
                  identity_sync._person_key_expr(), rules, groups, attrs)
           || identity_sync._from_clause(t.options);
    -- Parse and plan it once now, so a broken configuration never reaches the worker; by the
    -- column names _desired inserts.
    PERFORM identity_sync._use_user_search_path();
    EXECUTE format('SELECT %s FROM (%s) AS q', identity_sync._compiled_columns(), sql) USING '{}'::text[], CURRENT_DATE, 0;
    -- (unchanged text: no write, so recompiling after DDL on a source locks no target row)
    UPDATE identity_sync.target SET compiled = sql WHERE id = t.id AND compiled IS DISTINCT FROM sql;
END
$$;

-- After a change every target's query depends on (sources, primary contract, search_path).
CREATE FUNCTION identity_sync._recompile_all() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._compile(t.id) FROM identity_sync.target t ORDER BY t.id;
END
$$;
