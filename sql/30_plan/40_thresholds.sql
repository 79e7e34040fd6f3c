-- A threshold option (max_creates, max_disables, max_deletes): a count of accounts (50, "50")
-- or a percentage of the target's accounts from 0 to 100 ("10%", " 2.5 % "). The one reading of
-- it, for the option check (_validate_options) and for _check_thresholds; anything else is an
-- error whose message says what was expected.
CREATE FUNCTION identity_sync._threshold(v jsonb, OUT count numeric, OUT percent numeric)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expected constant text := 'a count such as 50 or a percentage such as ''10%''';
    s text := btrim(v->>0);
BEGIN
    IF jsonb_typeof(v) = 'number' THEN
        count := (v->>0)::numeric;
        IF count < 0 OR count <> trunc(count) THEN
            RAISE EXCEPTION USING MESSAGE = expected || '; a count is a whole number of accounts, 0 or more';
        END IF;
    ELSIF jsonb_typeof(v) = 'string' AND s ~ '^\d+$' THEN
        count := s::numeric;
    ELSIF jsonb_typeof(v) = 'string' AND s ~ '%$' THEN
        IF s !~ '^(\d+\.?\d*|\.\d+)\s*%$' OR rtrim(rtrim(s, '%'))::numeric > 100 THEN
            RAISE EXCEPTION USING MESSAGE = expected || '; a percentage is a number from 0 to 100 followed by %';
        END IF;
        percent := rtrim(rtrim(s, '%'))::numeric;
    ELSIF jsonb_typeof(v) = 'string' AND s ~ '^[-+]?[\d.]+$' THEN
        RAISE EXCEPTION USING MESSAGE = expected || '; a count is a whole number of accounts, 0 or more';
    ELSE
        RAISE EXCEPTION USING MESSAGE = expected;
    END IF;
END
$$;

-- Does a threshold stop this target? A threshold bounds the events of its kind planned in the
-- last hour since the last release(), this plan's included (`planned`: kind -> count).
CREATE FUNCTION identity_sync._check_thresholds(t identity_sync.target, planned jsonb)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    opt text;
    guarded text;   -- not "kind": that is also a column of _plan_count
    lim text;
    total bigint;
    accounts bigint;
    allowed numeric;
    th record;
BEGIN
    FOREACH opt IN ARRAY ARRAY['max_creates', 'max_disables', 'max_deletes'] LOOP
        lim := t.options->>opt;
        guarded := CASE opt WHEN 'max_creates' THEN 'create' WHEN 'max_disables' THEN 'disable' ELSE 'delete' END;
        CONTINUE WHEN lim IS NULL OR coalesce((planned->>guarded)::int, 0) = 0;
        -- This plan's counts are in _plan_count already (_plan_target records them first).
        SELECT coalesce(sum(c.n), 0) INTO total
          FROM identity_sync._plan_count c
         WHERE c.target_id = t.id AND c.kind = guarded
           AND c.at > greatest(now() - interval '1 hour', coalesce(t.released_at, '-infinity'));
        th := identity_sync._threshold(t.options->opt);
        IF th.percent IS NOT NULL THEN
            SELECT count(*) INTO accounts FROM identity_sync.account a
             WHERE a.target_id = t.id AND a.state <> 'deleted';
            allowed := floor(accounts * th.percent / 100);
        ELSE
            allowed := th.count;
        END IF;
        IF total > allowed THEN
            RETURN jsonb_build_object('threshold', opt, 'limit', lim, 'allowed', allowed,
                                      'planned', total, 'kind', guarded, 'since', now());
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
