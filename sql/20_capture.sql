-- Capture: statement triggers with transition tables write the affected person keys into the
-- outbox (identity_sync.change), one row per triggering statement; snapshot capture covers
-- sources that cannot carry triggers; the date-boundary check covers time passing.
--
-- Cost on the HR write path is one INSERT of one row holding an array, per statement (the
-- trigger function is identity_sync._capture, src/capture.rs). No row-level trigger, no
-- exception block, no per-row code, no index lookup: deduplication happens in the planner
-- (_claim_changes), off the write path.

-- Install the capture triggers of a source: the generic statement trigger identity_sync._capture
-- (src/capture.rs) with the source's id, role and key column (or, for a related source, its
-- affected query and the search_path it is written for) as arguments.
CREATE FUNCTION identity_sync._install_capture(source_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    op text;
    args text;
BEGIN
    SELECT * INTO src FROM identity_sync.source WHERE id = source_id;
    IF src.capture <> 'trigger' THEN
        RETURN;
    END IF;
    -- The user search_path (pg_temp last: an HR writer must not shadow a table the affected
    -- query names with a temporary one inside this SECURITY DEFINER trigger).
    args := CASE WHEN src.role = 'related'
                 THEN format('%s, %L, %L, %L', src.id, src.role, src.affected, identity_sync._user_search_path())
                 ELSE format('%s, %L, %L', src.id, src.role, src.key_column) END;
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture(%s)',
                       'identity_sync_capture_' || op, upper(op), src.relation,
                       CASE op WHEN 'insert' THEN 'NEW TABLE AS new_rows'
                               WHEN 'delete' THEN 'OLD TABLE AS old_rows'
                               ELSE 'OLD TABLE AS old_rows NEW TABLE AS new_rows' END,
                       args);
    END LOOP;
    EXECUTE format('CREATE TRIGGER identity_sync_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION identity_sync._capture_truncate(%s)',
                   src.relation, src.id);
END
$$;

CREATE FUNCTION identity_sync._uninstall_capture(source_id int)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    op text;
BEGIN
    SELECT * INTO src FROM identity_sync.source WHERE id = source_id;
    IF src.capture <> 'trigger' THEN
        RETURN;
    END IF;
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'identity_sync_capture_' || op, src.relation);
    END LOOP;
END
$$;

-- TRUNCATE of a source: every person of the person source and every person holding an account
-- is dirty (persons that vanished are disabled by the plan; thresholds guard against accidents).
CREATE FUNCTION identity_sync._capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO identity_sync.change (source_id, op, keys)
    SELECT TG_ARGV[0]::int, 'truncate', identity_sync._all_person_keys();
    PERFORM identity_sync._wake_at_commit();
    RETURN NULL;
END
$$;

CREATE FUNCTION identity_sync._all_person_keys() RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
    keys text[];
BEGIN
    IF p.id IS NULL THEN
        RETURN ARRAY(SELECT DISTINCT person_key FROM identity_sync.account);
    END IF;
    EXECUTE format('SELECT ARRAY(SELECT %I::text FROM %s UNION SELECT person_key FROM identity_sync.account)',
                   p.key_column, p.relation) INTO keys;
    RETURN keys;
END
$$;

-- Snapshot capture of a view or foreign table: compare a hash per person with the last run and
-- mark added, changed and removed persons dirty. One set-based statement per source.
CREATE FUNCTION identity_sync._snapshot_source(source_id int)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    keysql text;
    n int;
BEGIN
    SELECT * INTO src FROM identity_sync.source WHERE id = source_id;
    keysql := format('SELECT t.%I::text AS person_key, md5(string_agg(t::text, E''\n'' ORDER BY t::text))::bytea AS hash FROM %s AS t GROUP BY 1',
                     src.key_column, src.relation);
    EXECUTE format($q$
        WITH cur AS (%s),
        diff AS (
            SELECT coalesce(cur.person_key, s.person_key) AS person_key, cur.hash
              FROM cur FULL JOIN (SELECT * FROM identity_sync._snapshot WHERE source_id = $1) AS s
                ON s.person_key = cur.person_key
             WHERE cur.hash IS DISTINCT FROM s.hash),
        upd AS (
            INSERT INTO identity_sync._snapshot (source_id, person_key, hash)
            SELECT $1, person_key, hash FROM diff WHERE hash IS NOT NULL
            ON CONFLICT (source_id, person_key) DO UPDATE SET hash = excluded.hash),
        del AS (
            DELETE FROM identity_sync._snapshot s USING diff
             WHERE s.source_id = $1 AND s.person_key = diff.person_key AND diff.hash IS NULL),
        ins AS (
            INSERT INTO identity_sync.change (source_id, op, keys)
            SELECT $1, 'snapshot', array_agg(person_key) FROM diff HAVING count(*) > 0)
        SELECT count(*) FROM diff $q$, keysql)
    INTO n USING src.id;
    UPDATE identity_sync.source SET snapshot_at = now() WHERE id = src.id;
    RETURN n;
END
$$;

-- Set how often a snapshot-captured source is compared.
CREATE FUNCTION identity_sync.set_snapshot_interval(relation regclass, every interval)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE identity_sync.source s SET snapshot_interval = every
     WHERE s.relation = set_snapshot_interval.relation AND s.capture = 'snapshot';
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a snapshot-captured source', relation USING ERRCODE = 'undefined_object',
            HINT = 'Only views and foreign tables are captured by snapshots.';
    END IF;
    PERFORM identity_sync._audit('set_snapshot_interval', relation::text, NULL, to_jsonb(every));
END
$$;

-- Date boundaries: persons whose contract starts or ends, shifted by any target's lifecycle
-- intervals, were crossed in (last checked day, today]. Index range scans on the start and end
-- columns, one pair per distinct shift; the last checked day is stored, so a restart resumes.
CREATE FUNCTION identity_sync._check_boundaries()
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c identity_sync.source := identity_sync._contract_source();
    today date := identity_sync._today();
    last date := (SELECT boundary_checked_on FROM identity_sync._settings);
    shifts interval[];
    keys text[];
BEGIN
    IF last IS NULL OR c.id IS NULL OR today = last THEN
        UPDATE identity_sync._settings SET boundary_checked_on = today;
        RETURN 0;
    END IF;
    -- start shifts: create_before, enable_before (the account moves before the start);
    -- end shifts: disable_after, delete_after (after the inclusive last day).
    SELECT array_agg(DISTINCT s) INTO shifts FROM (
        SELECT -coalesce((options->>'create_before')::interval, '0') AS s FROM identity_sync.target
        UNION SELECT -coalesce((options->>'enable_before')::interval, '0') FROM identity_sync.target
        UNION SELECT interval '0') AS q;
    EXECUTE format($q$
        SELECT ARRAY(
            SELECT DISTINCT c.%1$I::text FROM unnest($1::interval[]) AS sh, %2$s AS c
             WHERE c.%3$I > ($3 - sh) AND c.%3$I <= ($4 - sh)
            UNION
            SELECT DISTINCT c.%1$I::text FROM unnest($2::interval[]) AS sh, %2$s AS c
             WHERE c.%4$I > ($3 - sh - interval '1 day') AND c.%4$I <= ($4 - sh - interval '1 day')
        ) $q$, c.key_column, c.relation, c.starts_column, c.ends_column)
    INTO keys
    USING shifts,
          ARRAY(SELECT DISTINCT coalesce((options->>x)::interval, '0')
                  FROM identity_sync.target, unnest(ARRAY['disable_after', 'delete_after']) AS x
                 UNION SELECT interval '0'),
          last, today;
    IF cardinality(keys) > 0 THEN
        INSERT INTO identity_sync.change (source_id, op, keys) VALUES (c.id, 'boundary', keys);
    END IF;
    UPDATE identity_sync._settings SET boundary_checked_on = today;
    RETURN coalesce(cardinality(keys), 0);
END
$$;

-- Pending changes, one row per person key, with the source and time of its first pending
-- change (unclaimed outbox rows and claimed-but-unplanned persons).
CREATE VIEW identity_sync.pending_changes AS
SELECT person_key,
       (array_agg(source ORDER BY at))[1] AS source,
       (array_agg(op ORDER BY at))[1] AS op,
       min(at) AS first_changed_at,
       count(*) AS changes
  FROM (SELECT k AS person_key, s.relation::text AS source, c.op, c.at
          FROM identity_sync.change c
          LEFT JOIN identity_sync.source s ON s.id = c.source_id,
               unnest(c.keys) AS k
        UNION ALL
        SELECT d.person_key, s.relation::text, d.op, d.first_at
          FROM identity_sync._dirty d
          LEFT JOIN identity_sync.source s ON s.id = d.source_id) AS q
 GROUP BY person_key;

-- HR writers need no privilege on the outbox: the capture trigger runs as the extension owner.
-- (_capture is written in Rust, src/capture.rs; lib.rs makes it come before this file.)
ALTER FUNCTION identity_sync._capture() SECURITY DEFINER;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.set_snapshot_interval(regclass, interval) TO identity_sync_admin;
GRANT SELECT ON identity_sync.pending_changes TO identity_sync_reader;

COMMENT ON FUNCTION identity_sync.set_snapshot_interval(regclass, interval) IS 'How often a view or foreign table source is compared with its last snapshot.';
COMMENT ON VIEW identity_sync.pending_changes IS 'Persons changed in HR and not yet planned, one row each, with the source and time of the first change.';
