-- Desired state of `keys` in target `t` into pg_temp._is_desired, unique values resolved.
-- With record_errors, per-person failures go to _plan_error; otherwise they are returned in
-- the error column only (preview). The compiled query runs isolated (_evaluate_compiled): a
-- timeout, or an error before any expression ran, is the target's and raised (60_plan.sql
-- defers the target); an error in an expression is tried person by person.
CREATE FUNCTION identity_sync._desired(t identity_sync.target, keys text[], today date, record_errors boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k text;
    m record;
    cap int := coalesce((t.options->>'unique_max_iterations')::int, 99);
    conflicted text[];
    it int;
    loops int;
    culprit text;
    detail text;
    hint text;
    one_attribute text;
    -- The compiled query's columns, by name (_compiled_columns, 30_plan/10_compile.sql).
    ins text := format('INSERT INTO pg_temp._is_desired (%1$s) SELECT %1$s FROM unnest($1) AS q',
                       identity_sync._compiled_columns());
BEGIN
    PERFORM identity_sync._scratch('_is_desired',
        'person_key text PRIMARY KEY, rules text[], groups text[], attributes jsonb, '
        'exists_now boolean, enabled_now boolean, creatable_now boolean, iteration int NOT NULL DEFAULT 0, error text');
    IF t.compiled IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        EXECUTE ins USING identity_sync._evaluate_compiled(t, keys, today, 0);
    EXCEPTION WHEN query_canceled THEN
        -- Timed out (or cancelled): persons one by one would each take as long.
        RAISE;
    WHEN OTHERS THEN
        IF identity_sync._failed_at() < 0 THEN
            -- Before any expression ran (a permission check as the executor started): the same
            -- for every person; named by checking the expressions one by one.
            GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
            culprit := identity_sync._blame(t);
            PERFORM identity_sync._raise(SQLSTATE, coalesce(culprit || ': ', '') || SQLERRM, detail, hint);
        END IF;
        -- One person's data broke the batch (say a subquery returned two rows): evaluate
        -- persons one by one so that only that person fails.
        FOREACH k IN ARRAY keys LOOP
            BEGIN
                EXECUTE ins USING identity_sync._evaluate_compiled(t, ARRAY[k], today, 0);
            EXCEPTION WHEN query_canceled THEN
                RAISE;
            WHEN OTHERS THEN
                INSERT INTO pg_temp._is_desired (person_key, error) VALUES (k, SQLERRM);
            END;
        END LOOP;
    END;

    -- is_unique: iterate the persons whose value is taken (by another person's account, or by
    -- a person earlier in key order in this batch) until their value is free.
    FOR m IN SELECT * FROM identity_sync.mapping WHERE target_id = t.id AND is_unique LOOP
        -- Each unique attribute searches from iteration 0 (its value in attributes is the one
        -- at iteration 0): continuing from where the previous unique attribute stopped gave
        -- values a re-plan would change.
        UPDATE pg_temp._is_desired SET iteration = 0 WHERE iteration <> 0;
        one_attribute := NULL;   -- this attribute's query, made at its first taken value
        -- On-create-only values of existing accounts are fixed: keep them.
        -- (Sublinks with OFFSET 0 stay index probes per person: the registry outgrows its
        -- statistics during a resync, and a hash of it per batch would be quadratic.)
        UPDATE pg_temp._is_desired d
           SET attributes = jsonb_set(d.attributes, ARRAY[m.attribute],
                 (SELECT a.planned_attributes->m.attribute FROM identity_sync.account a
                   WHERE a.target_id = t.id AND a.person_key = d.person_key))
         WHERE m.on_create_only AND d.error IS NULL
           AND EXISTS (SELECT FROM identity_sync.account a
                        WHERE a.target_id = t.id AND a.person_key = d.person_key
                          AND a.planned_state <> 'deleted' AND a.planned_attributes ? m.attribute OFFSET 0);
        loops := 0;
        LOOP
            -- The value's holder, read once per person (the primary key of _unique): a
            -- person already holding its value keeps it; others in the batch vary theirs (else
            -- a re-plan could move a value between persons); a value held by anyone else (NULL:
            -- an account we do not manage) is taken.
            SELECT array_agg(x.person_key) INTO conflicted
              FROM (SELECT d.person_key, coalesce(h.found, false) AND h.person_key IS DISTINCT FROM d.person_key AS taken,
                           row_number() OVER (PARTITION BY d.attributes->>m.attribute
                                              ORDER BY coalesce(h.person_key = d.person_key, false) DESC,
                                                       d.person_key) AS rn
                      FROM pg_temp._is_desired d
                      LEFT JOIN LATERAL (SELECT true AS found, u.person_key FROM identity_sync._unique u
                                          WHERE u.target_id = t.id AND u.attribute = m.attribute
                                            AND u.value = d.attributes->>m.attribute OFFSET 0) AS h ON true
                     WHERE d.error IS NULL AND d.rules <> '{}' AND d.attributes->>m.attribute IS NOT NULL
                       AND NOT (m.on_create_only AND EXISTS (
                                SELECT FROM identity_sync.account a
                                 WHERE a.target_id = t.id AND a.person_key = d.person_key
                                   AND a.planned_state <> 'deleted' AND a.planned_attributes ? m.attribute
                                OFFSET 0))) AS x
             WHERE x.rn > 1 OR x.taken;
            EXIT WHEN conflicted IS NULL;
            loops := loops + 1;
            FOR it IN SELECT DISTINCT d.iteration + 1 FROM pg_temp._is_desired d WHERE d.person_key = ANY (conflicted) LOOP
                IF it > cap THEN
                    UPDATE pg_temp._is_desired d
                       SET error = format('no free value for unique attribute "%s" after %s iterations (last tried "%s")',
                                          m.attribute, cap, d.attributes->>m.attribute)
                     WHERE d.person_key = ANY (conflicted) AND d.iteration + 1 = it;
                    CONTINUE;
                END IF;
                one_attribute := coalesce(one_attribute, identity_sync._compiled_attribute(t, m.attribute));
                UPDATE pg_temp._is_desired d
                   SET attributes = d.attributes || jsonb_build_object(m.attribute, q.attributes->m.attribute), iteration = it
                  FROM unnest(identity_sync._evaluate_compiled(
                           t, ARRAY(SELECT x.person_key FROM pg_temp._is_desired x
                                     WHERE x.person_key = ANY (conflicted) AND x.iteration + 1 = it),
                           today, it, one_attribute)) AS q
                 WHERE q.person_key = d.person_key;
            END LOOP;
        END LOOP;
    END LOOP;

    -- Temporary tables have no statistics until analysed; the diff joins on this one.
    ANALYZE pg_temp._is_desired;

    IF record_errors THEN
        INSERT INTO identity_sync._plan_error (target_id, person_key, message)
        SELECT t.id, d.person_key, d.error FROM pg_temp._is_desired d WHERE d.error IS NOT NULL
        ON CONFLICT (target_id, person_key) DO UPDATE SET message = excluded.message, at = now();
        DELETE FROM identity_sync._plan_error e
         WHERE e.target_id = t.id AND e.person_key = ANY (keys)
           AND NOT EXISTS (SELECT FROM pg_temp._is_desired d WHERE d.person_key = e.person_key AND d.error IS NOT NULL);
    END IF;
END
$$;

-- Groups of approved, unexpired requests of a person in a target, for the planner. Withheld
-- while the person's account is not enabled (before the start, after leaving).
-- No SET clause, so that the planner's diff inlines it (it runs for every planned person); every
-- name in it is schema-qualified.
CREATE FUNCTION identity_sync._granted_groups(target_id int, person_key text, enabled boolean)
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
