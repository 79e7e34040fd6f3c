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
        IF lim LIKE '%\%%' THEN
            SELECT count(*) INTO accounts FROM identity_sync.account a
             WHERE a.target_id = t.id AND a.state <> 'deleted';
            allowed := floor(accounts * rtrim(btrim(lim), '%')::numeric / 100);
        ELSE
            allowed := lim::numeric;
        END IF;
        IF total > allowed THEN
            RETURN jsonb_build_object('threshold', opt, 'limit', lim, 'allowed', allowed,
                                      'planned', total, 'kind', guarded, 'since', now());
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
