-- Diff desired state against the registry into pg_temp._is_plan: one row per person with the
-- state it should reach and the events that get it there.
CREATE FUNCTION identity_sync._diff(t identity_sync.target, keys text[], today date)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Attributes sent at creation only never count as changed.
    create_only text[] := ARRAY(SELECT attribute FROM identity_sync.mapping
                                 WHERE target_id = t.id AND on_create_only);
    -- The account of a person no rule matches any more (or who is gone from HR): disabled
    -- (default), kept as it is (no event at all until a rule matches again), or deleted.
    out_of_scope text := coalesce(t.options->>'out_of_scope', 'disable');
BEGIN
    PERFORM identity_sync._scratch('_is_plan',
        'person_key text PRIMARY KEY, in_scope boolean, rules text[], has_account boolean, '
        'planned_state text, want_state text, attributes jsonb, changed jsonb, previous jsonb, '
        'groups text[], to_grant text[], to_revoke text[], seq bigint, events jsonb, '
        'n_events int, has_update boolean');

    INSERT INTO pg_temp._is_plan
    SELECT k.person_key, s.in_scope, s.rules, s.has_account, s.planned_state, s.want_state,
           s.attributes, s.changed, s.previous, s.groups, s.to_grant, s.to_revoke, s.seq,
           ev.events, jsonb_array_length(ev.events), ev.events @> '[{"kind": "update"}]'
      FROM unnest(keys) AS k(person_key)
      LEFT JOIN pg_temp._is_desired d USING (person_key)
      -- A probe of the account's primary key per person: the registry grows during a resync
      -- faster than its statistics, and a hash of every account per batch would be quadratic.
      LEFT JOIN LATERAL (SELECT * FROM identity_sync.account x
                          WHERE x.target_id = t.id AND x.person_key = k.person_key OFFSET 0) AS a ON true
     CROSS JOIN LATERAL (
        SELECT coalesce(d.rules <> '{}', false) AS in_scope,
               coalesce(d.rules, '{}') AS rules,
               (a.person_key IS NOT NULL AND a.planned_state <> 'deleted') AS has_account,
               a.planned_state,
               coalesce(a.seq, 0) AS seq,
               -- A person gone from HR is out of scope and, if the target deletes, past it.
               -- An orphan (reconcile, option orphans) is retired: disabled, or deleted.
               coalesce(d.exists_now, CASE WHEN a.orphan THEN t.options->>'orphans' IS DISTINCT FROM 'delete'
                                           ELSE t.options->>'delete_after' IS NULL END) AS exists_now,
               coalesce(d.enabled_now, false) AS enabled_now,
               coalesce(d.creatable_now, false) AS creatable_now,
               -- out_of_scope = keep: an account out of scope (not an orphan, which reconcile
               -- retires) is left exactly as planned so far.
               (out_of_scope = 'keep' AND a.person_key IS NOT NULL AND a.planned_state <> 'deleted'
                AND NOT a.orphan AND NOT coalesce(d.rules <> '{}', false)) AS kept
         -- OFFSET 0 keeps each lateral step computed once per person instead of being
         -- flattened into (and recomputed by) every expression that uses it.
         OFFSET 0) AS b
     CROSS JOIN LATERAL (
        SELECT CASE
                 WHEN b.kept THEN b.planned_state
                 WHEN b.has_account THEN
                   CASE WHEN NOT b.exists_now THEN 'deleted'
                        WHEN b.in_scope AND b.enabled_now THEN 'active'
                        WHEN NOT b.in_scope AND NOT a.orphan AND out_of_scope = 'delete' THEN 'deleted'
                        ELSE 'disabled' END
                 WHEN b.in_scope AND b.exists_now AND b.creatable_now THEN
                   CASE WHEN b.enabled_now THEN 'active' ELSE 'disabled' END
               END AS want_state OFFSET 0) AS w
     CROSS JOIN LATERAL (
        SELECT b.in_scope, b.rules, b.has_account, b.planned_state, w.want_state, b.seq,
               CASE WHEN b.kept THEN a.planned_attributes ELSE coalesce(d.attributes, '{}') END AS attributes,
               coalesce(ch.changed, '{}') AS changed,
               coalesce(ch.previous, '{}') AS previous,
               g.groups,
               ARRAY(SELECT x FROM unnest(g.groups) AS x
                      WHERE NOT (b.has_account AND x = ANY (a.planned_groups)) ORDER BY x) AS to_grant,
               ARRAY(SELECT x FROM unnest(CASE WHEN b.has_account THEN a.planned_groups ELSE '{}' END) AS x
                      WHERE x <> ALL (g.groups) ORDER BY x) AS to_revoke
          FROM (SELECT CASE WHEN b.kept THEN a.planned_groups
                            WHEN w.want_state IN ('active', 'disabled') AND b.in_scope
                            THEN ARRAY(SELECT DISTINCT x FROM unnest(coalesce(d.groups, '{}')
                                         || identity_sync._granted_groups(t.id, k.person_key, b.enabled_now)) AS x ORDER BY x)
                            ELSE '{}'::text[] END AS groups OFFSET 0) AS g
          LEFT JOIN LATERAL (
            SELECT jsonb_object_agg(e.key, e.value) AS changed,
                   jsonb_object_agg(e.key, a.planned_attributes->e.key) AS previous
              FROM jsonb_each(d.attributes) AS e
             WHERE b.has_account AND NOT b.kept
               AND a.planned_attributes IS DISTINCT FROM d.attributes  -- fast path
               AND e.key <> ALL (create_only)
               AND a.planned_attributes->e.key IS DISTINCT FROM e.value) AS ch ON true OFFSET 0) AS s
     -- The events, in the order they must be delivered: delete, create, enable, update, grants
     -- and revokes (each by group name), disable. (Concatenated, not a UNION ALL aggregated and
     -- sorted per person: that was a quarter of the diff's time.)
     CROSS JOIN LATERAL (
        SELECT CASE WHEN s.has_account AND s.want_state = 'deleted'
                    THEN '[{"kind": "delete", "payload": {}}]'::jsonb ELSE '[]' END
            || CASE WHEN NOT s.has_account AND s.want_state IN ('active', 'disabled')
                    THEN jsonb_build_array(jsonb_build_object('kind', 'create', 'payload',
                             jsonb_build_object('attributes', s.attributes, 'active', s.want_state = 'active', 'groups', s.groups)))
                    ELSE '[]' END
            || CASE WHEN s.has_account AND s.planned_state = 'disabled' AND s.want_state = 'active'
                    THEN '[{"kind": "enable", "payload": {"active": true}}]'::jsonb ELSE '[]' END
            || CASE WHEN s.has_account AND s.want_state <> 'deleted' AND s.changed <> '{}'
                    THEN jsonb_build_array(jsonb_build_object('kind', 'update', 'payload',
                             jsonb_build_object('changed', s.changed, 'previous', s.previous, 'attributes', s.attributes)))
                    ELSE '[]' END
            || CASE WHEN s.want_state IN ('active', 'disabled') AND s.to_grant <> '{}'
                    THEN (SELECT jsonb_agg(jsonb_build_object('kind', 'grant', 'payload', jsonb_build_object('group', g)) ORDER BY g)
                            FROM unnest(s.to_grant) AS g)
                    ELSE '[]' END
            || CASE WHEN s.want_state IN ('active', 'disabled') AND s.to_revoke <> '{}'
                    THEN (SELECT jsonb_agg(jsonb_build_object('kind', 'revoke', 'payload', jsonb_build_object('group', g)) ORDER BY g)
                            FROM unnest(s.to_revoke) AS g)
                    ELSE '[]' END
            || CASE WHEN s.has_account AND s.planned_state = 'active' AND s.want_state = 'disabled'
                    THEN '[{"kind": "disable", "payload": {"active": false}}]'::jsonb ELSE '[]' END
               AS events
         OFFSET 0) AS ev
     WHERE d.error IS NULL;
END
$$;
