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
    rel regclass := (SELECT s.relation FROM identity_sync.source s WHERE s.id = source_id AND s.capture = 'trigger');
    op text;
BEGIN
    IF rel IS NOT NULL THEN
        FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'identity_sync_capture_' || op, rel);
        END LOOP;
    END IF;
END
$$;

-- TRUNCATE of a source: every person of the person source and every person holding an account
-- is dirty (persons that vanished are disabled by the plan; thresholds guard against accidents).
CREATE FUNCTION identity_sync._capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_WHEN <> 'AFTER' OR TG_LEVEL <> 'STATEMENT' OR TG_OP <> 'TRUNCATE' OR TG_NARGS <> 1
       OR TG_ARGV[0] !~ '^[0-9]{1,9}$' THEN
        RAISE EXCEPTION 'trigger "%" on %.% is not a valid identity_sync truncate trigger',
                        TG_NAME, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME)
            USING ERRCODE = 'trigger_protocol_violated',
                  DETAIL = format('It fires %s %s FOR EACH %s with %s argument(s); identity_sync installs '
                                  'identity_sync._capture_truncate as an AFTER TRUNCATE trigger FOR EACH STATEMENT '
                                  'with the source id as its one argument.', TG_WHEN, TG_OP, TG_LEVEL, TG_NARGS),
                  HINT = format('Remove it (DROP TRIGGER %I ON %I.%I;); identity_sync installs its own when a source is registered.',
                                TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME);
    END IF;
    INSERT INTO identity_sync.change (source_id, op, keys)
    SELECT TG_ARGV[0]::int, 'truncate', identity_sync._all_person_keys();
    PERFORM identity_sync._wake_at_commit();
    RETURN NULL;
END
$$;

-- VOLATILE, not STABLE: a planner that estimates the rows of unnest(f()) evaluates a STABLE f()
-- without arguments at plan time (estimate_expression_value), so every plan of _claim_changes
-- (a SQL function, planned on each call) read the whole person source and registry, whether or
-- not anybody was to be planned: 50-200 ms per worker tick (bench/run --profile).
CREATE FUNCTION identity_sync._all_person_keys() RETURNS text[]
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
    keys text[];
BEGIN
    IF p.id IS NULL THEN
        RETURN ARRAY(SELECT DISTINCT person_key FROM identity_sync.account);
    END IF;
    -- Several person sources (15_sources.sql): every linked person, and every holder of an
    -- account but the merged persons of open merge conflicts, whose accounts wait.
    IF identity_sync._several_sources() THEN
        RETURN ARRAY(SELECT person_key FROM identity_sync._person_link
                     UNION SELECT person_key FROM identity_sync.account
                     EXCEPT SELECT merged_key FROM identity_sync._merge_conflict WHERE resolved_at IS NULL);
    END IF;
    -- The person source as identity_sync.run_as (src/evaluate.rs): a view's functions run as
    -- that role, not as the owner of this function.
    keys := identity_sync._evaluate(format('SELECT ARRAY(SELECT %I::text FROM %s)', p.key_column, p.relation),
                                    NULL::text[], ARRAY[format('person source %s', p.relation)]);
    RETURN ARRAY(SELECT unnest(keys) UNION SELECT person_key FROM identity_sync.account);
END
$$;

-- A person's hash in a snapshot.
CREATE TYPE identity_sync._key_hash AS (person_key text, hash bytea);

-- Snapshot capture of a view or foreign table: compare a hash per person with the last run and
-- mark added, changed and removed persons dirty. The source is read as identity_sync.run_as
-- (src/evaluate.rs): a view's functions run as that role, never as the extension owner.
CREATE FUNCTION identity_sync._snapshot_source(source_id int)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    src identity_sync.source;
    hashes identity_sync._key_hash[];
    n int;
BEGIN
    SELECT * INTO src FROM identity_sync.source WHERE id = source_id;
    hashes := identity_sync._evaluate(
        format('SELECT coalesce(array_agg(ROW(q.person_key, q.hash)::identity_sync._key_hash), ''{}'') FROM ('
               'SELECT t.%I::text AS person_key, md5(string_agg(t::text, E''\n'' ORDER BY t::text))::bytea AS hash FROM %s AS t GROUP BY 1) AS q',
               src.key_column, src.relation),
        NULL::identity_sync._key_hash[], ARRAY[format('snapshot of source %s', src.relation)]);
    WITH cur AS (SELECT * FROM unnest(hashes)),
        diff AS (
            SELECT coalesce(cur.person_key, s.person_key) AS person_key, cur.hash
              FROM cur FULL JOIN (SELECT * FROM identity_sync._snapshot WHERE source_id = src.id) AS s
                ON s.person_key = cur.person_key
             WHERE cur.hash IS DISTINCT FROM s.hash),
        upd AS (
            INSERT INTO identity_sync._snapshot (source_id, person_key, hash)
            SELECT src.id, person_key, hash FROM diff WHERE hash IS NOT NULL
            ON CONFLICT (source_id, person_key) DO UPDATE SET hash = excluded.hash),
        del AS (
            DELETE FROM identity_sync._snapshot s USING diff
             WHERE s.source_id = src.id AND s.person_key = diff.person_key AND diff.hash IS NULL),
        ins AS (
            INSERT INTO identity_sync.change (source_id, op, keys)
            SELECT src.id, 'snapshot', array_agg(person_key) FROM diff HAVING count(*) > 0)
    SELECT count(*) INTO n FROM diff;
    UPDATE identity_sync.source SET snapshot_at = now() WHERE id = src.id;
    RETURN n;
END
$$;

-- Set how often a snapshot-captured source is compared.
CREATE FUNCTION identity_sync.set_snapshot_interval(relation regclass, every interval)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF every IS NULL OR every <= interval '0' THEN
        RAISE EXCEPTION 'invalid snapshot interval: %', coalesce(every::text, 'null') USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Expected a positive interval such as ''1 minute''.';
    END IF;
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
    n int := 0;
    today date := identity_sync._today();
    last date := (SELECT boundary_checked_on FROM identity_sync._settings);
    shifts interval[];
    end_shifts interval[];
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
    end_shifts := ARRAY(SELECT DISTINCT coalesce((options->>x)::interval, '0')
                          FROM identity_sync.target, unnest(ARRAY['disable_after', 'delete_after']) AS x
                         UNION SELECT interval '0');
    -- Each contract source as identity_sync.run_as (src/evaluate.rs), like every read of a
    -- source (several with several person sources: their keys become person keys when claimed).
    FOR c IN SELECT * FROM identity_sync.source WHERE role = 'contract' ORDER BY id LOOP
        keys := identity_sync._evaluate(format($q$
            SELECT ARRAY(
                SELECT DISTINCT c.%1$I::text FROM unnest(%5$L::interval[]) AS sh, %2$s AS c
                 WHERE c.%3$I > (%7$L::date - sh) AND c.%3$I <= (%8$L::date - sh)
                UNION
                SELECT DISTINCT c.%1$I::text FROM unnest(%6$L::interval[]) AS sh, %2$s AS c
                 WHERE c.%4$I > (%7$L::date - sh - interval '1 day') AND c.%4$I <= (%8$L::date - sh - interval '1 day')
            ) $q$, c.key_column, c.relation, c.starts_column, c.ends_column, shifts, end_shifts, last, today),
            NULL::text[], ARRAY[format('contract source %s', c.relation)]);
        IF cardinality(keys) > 0 THEN
            INSERT INTO identity_sync.change (source_id, op, keys) VALUES (c.id, 'boundary', keys);
        END IF;
        n := n + coalesce(cardinality(keys), 0);
    END LOOP;
    UPDATE identity_sync._settings SET boundary_checked_on = today;
    RETURN n;
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
          LEFT JOIN identity_sync.source s ON s.id = d.source_id
        UNION ALL
        -- waiting for a target whose planning failed (30_plan/60_plan.sql)
        SELECT d.person_key, s.relation::text, d.op, d.first_at
          FROM identity_sync._deferred d
          LEFT JOIN identity_sync.source s ON s.id = d.source_id) AS q
 GROUP BY person_key;

------------------------------------------------------------------------------------------------
-- Schema changes of sources: two event triggers keep every registration true to its table, so
-- that an HR schema change can never leave every HR write failing (the capture trigger reads
-- the registered key column; a related source's trigger runs its affected query) nor the
-- planner compiling against names that are gone. What a DBA meets (README, "Schema changes of
-- sources"):
--   * DROP of a registered table, view or foreign table (also through DROP SCHEMA ... CASCADE,
--     DROP OWNED, a dropped server or extension), and DROP COLUMN of a registered person key,
--     starts or ends column: refused (2BP01), HINT drop_source first. (sql_drop)
--   * RENAME of a registered column: followed: the registration takes the new name, the
--     capture triggers are installed again with it, the targets are compiled again; a NOTICE
--     says so. (ddl_command_end)
--   * RENAME or SET SCHEMA of a source table, RENAME of its schema: followed (the registration
--     holds the table's oid); the targets are compiled again.
--   * Any change to a source that leaves a target's mappings or rules unable to compile (a
--     renamed or dropped column they use), or the self-service login expression or a product's
--     owners condition failing, a contract date column that is no longer a date or timestamp,
--     or a change anywhere that breaks a related source's affected query: refused (2BP01 /
--     42804), with what breaks named and PostgreSQL's own error as DETAIL.
-- The extension's own DDL passes untouched: CREATE/DROP TRIGGER (drop_source, the follow
-- itself) are not among the tags, the handlers return at once while no source is registered,
-- and a dropped extension takes its event triggers with it before they could fire.
------------------------------------------------------------------------------------------------

-- A registered column, as a DBA reads it: 'person key', 'starts' or 'ends' column of src.
CREATE FUNCTION identity_sync._registered_column_role(src identity_sync.source, col name)
RETURNS text LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE col WHEN src.key_column THEN 'person key'
                    WHEN src.starts_column THEN 'starts column'
                    WHEN src.ends_column THEN 'ends column' END
$$;

-- sql_drop: refuse to drop a registered relation or a registered column of one.
CREATE FUNCTION identity_sync._refuse_source_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    rel text;
    what text;
BEGIN
    IF to_regclass('identity_sync.source') IS NULL THEN
        RETURN;
    END IF;
    FOR d IN
        SELECT o.object_type, o.object_identity, o.objsubid, o.address_names, s AS src
          FROM pg_event_trigger_dropped_objects() AS o
          JOIN identity_sync.source AS s ON s.relation = o.objid::regclass
         WHERE o.classid = 'pg_class'::regclass
         ORDER BY s.id, o.objsubid
    LOOP
        IF d.objsubid = 0 THEN
            RAISE EXCEPTION 'cannot drop % %: it is an identity_sync source', d.object_type, d.object_identity
                USING ERRCODE = 'dependent_objects_still_exist',
                      DETAIL = format('%s is %s; the accounts of its persons are planned from it.', d.object_identity,
                                      CASE (d.src).role WHEN 'related' THEN 'a related source' ELSE format('the %s source', (d.src).role) END),
                      HINT = format('Drop the source first: SELECT identity_sync.drop_source(%L);', d.object_identity);
        END IF;
        what := identity_sync._registered_column_role(d.src, d.address_names[cardinality(d.address_names)]);
        IF what IS NOT NULL THEN
            rel := format('%I.%I', d.address_names[1], d.address_names[2]);
            RAISE EXCEPTION 'cannot drop column "%" of %: it is the % of an identity_sync source',
                            d.address_names[3], rel, what
                USING ERRCODE = 'dependent_objects_still_exist',
                      DETAIL = CASE WHEN what = 'person key'
                                    THEN format('The capture triggers of %s read the person key of every written row from it.', rel)
                                    ELSE format('Planning and the date-boundary check read the contracts'' dates from it.') END,
                      HINT = format('Drop the source first (SELECT identity_sync.drop_source(%L);), or register it again with another column.', rel);
        END IF;
    END LOOP;
END
$$;

-- Refuse a schema change that `breaks` something registered (_follow_source_ddl): the error it
-- caused (`msg`, `det`, `hnt`, from GET STACKED DIAGNOSTICS) raised again, its hint followed by
-- `fix`.
CREATE FUNCTION identity_sync._refuse_breaking_change(breaks text, msg text, det text, hnt text, fix text)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'this change breaks %', breaks
        USING ERRCODE = 'dependent_objects_still_exist',
              DETAIL = msg || CASE WHEN det <> '' THEN E'\n' || det ELSE '' END,
              HINT = CASE WHEN hnt <> '' THEN hnt || E'\n' ELSE '' END || fix;
END
$$;

-- ddl_command_end: follow renames of registered columns and tables, and refuse a change that
-- leaves a target or a related source's affected query broken.
CREATE FUNCTION identity_sync._follow_source_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    old identity_sync.source;
    missing name[];
    renamed name;
    touched boolean := false;
    t record;
    ty regtype;
    what text;
    msg text;
    det text;
    hnt text;
BEGIN
    IF to_regclass('identity_sync.source') IS NULL OR NOT EXISTS (SELECT FROM identity_sync.source) THEN
        RETURN;
    END IF;
    -- The sources this command changed: the table itself, or the schema it lives in.
    FOR src IN
        SELECT s.* FROM identity_sync.source AS s
         WHERE s.id IN (SELECT s2.id
                          FROM identity_sync.source AS s2
                          JOIN pg_class AS r ON r.oid = s2.relation,
                               pg_event_trigger_ddl_commands() AS c
                         WHERE (c.classid = 'pg_class'::regclass AND c.objid = r.oid)
                            OR (c.classid = 'pg_namespace'::regclass AND c.objid = r.relnamespace))
         ORDER BY s.id
    LOOP
        touched := true;
        missing := ARRAY(SELECT col FROM unnest(ARRAY[src.key_column, src.starts_column, src.ends_column]) AS col
                          WHERE col IS NOT NULL AND NOT EXISTS (
                                SELECT FROM pg_attribute a
                                 WHERE a.attrelid = src.relation AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped));
        IF cardinality(missing) > 0 THEN
            -- RENAME COLUMN reports the renamed column by its number.
            SELECT a.attname INTO renamed
              FROM pg_event_trigger_ddl_commands() AS c
              JOIN pg_attribute AS a ON a.attrelid = c.objid AND a.attnum = c.objsubid
             WHERE c.classid = 'pg_class'::regclass AND c.objid = src.relation AND c.objsubid > 0
               AND c.object_type LIKE '%column';
            IF renamed IS NULL OR cardinality(missing) > 1 THEN
                -- (sql_drop refuses drops; this is a column gone some other way)
                RAISE EXCEPTION 'the % of identity_sync source % does not exist any more: "%"',
                                identity_sync._registered_column_role(src, missing[1]), src.relation, missing[1]
                    USING ERRCODE = 'dependent_objects_still_exist',
                          HINT = format('Undo the change, or drop the source first (SELECT identity_sync.drop_source(%L);).', src.relation::text);
            END IF;
            old := src;
            src.key_column := CASE WHEN src.key_column = missing[1] THEN renamed ELSE src.key_column END;
            src.starts_column := CASE WHEN src.starts_column = missing[1] THEN renamed ELSE src.starts_column END;
            src.ends_column := CASE WHEN src.ends_column = missing[1] THEN renamed ELSE src.ends_column END;
            UPDATE identity_sync.source
               SET key_column = src.key_column, starts_column = src.starts_column, ends_column = src.ends_column
             WHERE id = src.id;
            PERFORM identity_sync._uninstall_capture(src.id);
            PERFORM identity_sync._install_capture(src.id);
            PERFORM identity_sync._audit('follow_rename', src.relation::text, to_jsonb(old), to_jsonb(src));
            RAISE NOTICE 'identity_sync follows the rename: the % of source % is now "%"',
                         identity_sync._registered_column_role(old, missing[1]), src.relation, renamed;
        END IF;
        IF src.role = 'contract' THEN
            FOREACH renamed IN ARRAY ARRAY[src.starts_column, src.ends_column] LOOP
                ty := identity_sync._column_type(src.relation, renamed, 'contract date');
                IF ty NOT IN ('date'::regtype, 'timestamp'::regtype, 'timestamptz'::regtype) THEN
                    RAISE EXCEPTION 'column "%" of % must stay of type date or timestamp, not %', renamed, src.relation, ty
                        USING ERRCODE = 'datatype_mismatch',
                              DETAIL = format('It is the %s of the identity_sync contract source.',
                                              identity_sync._registered_column_role(src, renamed)),
                              HINT = format('Undo the change, or drop the source first (SELECT identity_sync.drop_source(%L);).', src.relation::text);
                END IF;
            END LOOP;
        END IF;
    END LOOP;

    -- Targets are compiled against the sources' names, columns and types: compile them again.
    IF touched THEN
        FOR t IN SELECT id, name FROM identity_sync.target ORDER BY id LOOP
            BEGIN
                PERFORM identity_sync._compile(t.id);
            -- (what identity_sync.run_as may not read is a matter of grants, not of this change:
            -- a restore runs DDL before it restores the grants; planning names it if it stays)
            EXCEPTION WHEN insufficient_privilege THEN
                NULL;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
                PERFORM identity_sync._refuse_breaking_change(format('the mappings or rules of target "%s"', t.name), msg, det, hnt,
                    'Change the mappings and rules that use it in the same transaction as the schema change '
                    '(identity_sync.unmap and map, drop_rule and add_rule), or undo the change.');
            END;
        END LOOP;
        -- So is self-service: the login expression and the products' owners conditions.
        BEGIN
            msg := NULL;
            IF (SELECT login_expression FROM identity_sync._settings) IS NOT NULL
               AND (identity_sync._person_source()).id IS NOT NULL THEN
                what := 'the self-service login expression';
                PERFORM identity_sync._use_user_search_path();
                PERFORM identity_sync._check_expression(
                    'SELECT (' || (SELECT login_expression FROM identity_sync._settings) || E'\n) AS v FROM '
                        || (identity_sync._person_source()).relation::text || ' AS person LIMIT 0',
                    8, (SELECT login_expression FROM identity_sync._settings), 'login expression');
                PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            END IF;
            FOR t IN SELECT name, owners FROM identity_sync.product ORDER BY id LOOP
                what := format('the owners condition of product "%s"', t.name);
                PERFORM identity_sync._check_owners(t.owners);
            END LOOP;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;   -- (grants, not this change: see above)
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
            PERFORM identity_sync._refuse_breaking_change(what, msg, det, hnt,
                'Change it in the same transaction as the schema change (identity_sync.set_login, alter_product), or undo the change.');
        END;
    END IF;

    -- Every related source's affected query runs inside each write to its table: it must still
    -- work, whichever table this command changed.
    FOR src IN SELECT * FROM identity_sync.source WHERE role = 'related' AND capture = 'trigger' ORDER BY id LOOP
        BEGIN
            PERFORM identity_sync._use_user_search_path();
            PERFORM identity_sync._check_query(
                identity_sync._affected_probe(src.relation) || src.affected || E'\n) AS a LIMIT 0',
                length(identity_sync._affected_probe(src.relation)), src.affected, 'affected query');
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;   -- (grants, not this change: see above)
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
            PERFORM identity_sync._refuse_breaking_change(format('the affected query of related source %s', src.relation), msg, det, hnt,
                format('Register the source again with a query that works, in the same transaction as the schema change '
                       '(SELECT identity_sync.drop_source(%L); SELECT identity_sync.add_related_source(%L, <affected query>);), '
                       'or undo the change.', src.relation::text, src.relation::text));
        END;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER identity_sync_refuse_source_drop ON sql_drop
    EXECUTE FUNCTION identity_sync._refuse_source_drop();
CREATE EVENT TRIGGER identity_sync_follow_source_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER VIEW', 'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE', 'ALTER SCHEMA',
                 'DROP TABLE', 'DROP VIEW', 'DROP MATERIALIZED VIEW', 'DROP FOREIGN TABLE', 'DROP SCHEMA',
                 'DROP FUNCTION', 'DROP TYPE', 'DROP DOMAIN')
    EXECUTE FUNCTION identity_sync._follow_source_ddl();

-- HR writers need no privilege on the outbox: the capture trigger runs as the extension owner,
-- with a search_path of its own (a related source's affected query gets the configured one).
-- (_capture is written in Rust, src/capture.rs; lib.rs makes it come before this file.)
ALTER FUNCTION identity_sync._capture() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.set_snapshot_interval(regclass, interval) TO identity_sync_admin;
GRANT SELECT ON identity_sync.pending_changes TO identity_sync_reader;

COMMENT ON FUNCTION identity_sync.set_snapshot_interval(regclass, interval) IS 'How often a view or foreign table source is compared with its last snapshot.';
COMMENT ON VIEW identity_sync.pending_changes IS 'Persons changed in HR and not yet planned, one row each, with the source and time of the first change.';
