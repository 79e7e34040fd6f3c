-- Several sources for one person: employees from HR, contractors from a vendor database (a
-- foreign table), board members from a spreadsheet, each a person source with a name and a
-- priority (add_person_source(..., source => 'contractors', priority => 50)), each with at most
-- one contract source (add_contract_source(..., source => 'contractors')).
--
-- With one person source named 'default' (every configuration made before several sources
-- existed) nothing here runs: person keys are that source's keys, and the person document is
-- the one of 30_plan/00_person.sql as it always was. As soon as another person source is
-- registered, every source record is linked to a person (_person_link, 00_schema.sql):
--   * a record of the default source links to its own key, another source's record to
--     '<source>:<key>', unless the match rule (set_person_match: SQL over two records a and b
--     of different sources) joins it to a person already linked: then it is that person;
--   * links never change by themselves: a person key stays when a source appears or a record
--     goes away (leaving one source while present in another is a mover, not a leaver);
--   * a match that joins two persons keeps the one with accounts (_merge); when both have
--     accounts, the other's are left alone and listed in merge_conflicts until an operator
--     resolves the case (resolve_merge_conflict).
-- Capture stays per source (statement triggers, snapshots): the outbox holds source keys, and
-- the planner's claim (_claim_changes) turns them into person keys with _link_keys, which links
-- new records as it meets them. The person document over several sources is built by
-- _from_clause from _records_sql (30_plan/00_person.sql).

-- Are persons made of several sources (links kept, the several-sources document)? Once true it
-- stays true while links exist, so that the keys of merged persons keep holding.
CREATE FUNCTION identity_sync._several_sources() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM identity_sync.source WHERE role = 'person' AND name IS DISTINCT FROM 'default')
        OR EXISTS (SELECT FROM identity_sync._person_link)
$$;

-- With several sources every record carries its source's name as the column "source": a person
-- or contract source may not have a column of that name.
CREATE FUNCTION identity_sync._check_several_sources() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s identity_sync.source;
BEGIN
    SELECT * INTO s FROM identity_sync.source x
     WHERE x.role IN ('person', 'contract')
       AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = x.relation AND a.attname = 'source'
                      AND a.attnum > 0 AND NOT a.attisdropped)
     ORDER BY x.id LIMIT 1;
    IF s.id IS NOT NULL THEN
        RAISE EXCEPTION '% source % has a column named "source"', s.role, s.relation USING ERRCODE = 'duplicate_column',
            DETAIL = 'With several person sources, person, contract and each record of persons and contracts carry the source''s name as "source".',
            HINT = format('Register a view that renames the column, e.g. CREATE VIEW ... AS SELECT source AS origin, ... FROM %s.', s.relation);
    END IF;
END
$$;

-- The columns of the records of person (or contract) sources taken together, each once, in the
-- order the sources give them (by priority, then registration); its type is that of the first
-- source that has it, and the others' values are cast to it. A contract source's starts and
-- ends columns also fill the first contract source's, so every contract has its dates under the
-- same names (the primary contract order and the lifecycle read those).
CREATE FUNCTION identity_sync._union_columns(role text)
RETURNS TABLE (col name, typ text, n int)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT DISTINCT ON (a.attname) a.attname, format_type(a.atttypid, a.atttypmod),
           (row_number() OVER (ORDER BY s.priority DESC NULLS LAST, s.id, a.attnum))::int
      FROM identity_sync.source s
      JOIN pg_attribute a ON a.attrelid = s.relation AND a.attnum > 0 AND NOT a.attisdropped
     WHERE s.role = _union_columns.role
     ORDER BY a.attname, s.priority DESC NULLS LAST, s.id, a.attnum
$$;

-- SQL text of the records of every person (role 'person') or contract ('contract') source, one
-- UNION ALL branch per source, with the columns source (the name), _key (the person key in
-- that source, as text) and the union of the sources' columns (_union_columns); person records
-- also priority and _always (its source has no contract source: present means working).
-- linked: only the records of the person _k.person_key, found through its links _k._links
-- (_links_of), each also as _record (its own row as jsonb); else every record. NULL when no
-- source has the role.
CREATE FUNCTION identity_sync._records_sql(role text, linked boolean)
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s identity_sync.source;
    first identity_sync.source := identity_sync._contract_source();
    c record;
    cols text;
    branches text[] := '{}';
    from_ text;
BEGIN
    FOR s IN SELECT * FROM identity_sync.source x WHERE x.role = _records_sql.role ORDER BY x.priority DESC NULLS LAST, x.id LOOP
        cols := '';
        FOR c IN SELECT * FROM identity_sync._union_columns(role) ORDER BY n LOOP
            cols := cols || ', ' || CASE
                WHEN role = 'contract' AND c.col IN (first.starts_column, first.ends_column) THEN
                    format('t.%I::%s AS %I', CASE c.col WHEN first.starts_column THEN s.starts_column ELSE s.ends_column END, c.typ, c.col)
                WHEN EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = s.relation AND a.attname = c.col
                                AND a.attnum > 0 AND NOT a.attisdropped) THEN
                    format('t.%I::%s AS %I', c.col, c.typ, c.col)
                ELSE format('NULL::%s AS %I', c.typ, c.col) END;
        END LOOP;
        IF linked THEN
            from_ := format('(SELECT x->>0 AS source, x->>1 AS source_key FROM jsonb_array_elements(_k._links::jsonb) AS x) AS l '
                            'JOIN %s AS t ON t.%I = l.source_key::%s WHERE l.source = %L',
                            s.relation, s.key_column, identity_sync._column_type(s.relation, s.key_column, 'person key'), s.name);
            cols := cols || ', to_jsonb(t) AS _record';
        ELSE
            from_ := format('%s AS t', s.relation);
        END IF;
        branches := branches || format('SELECT %L::text AS source, t.%I::text AS _key%s%s FROM %s',
            s.name, s.key_column,
            CASE WHEN role = 'person'
                 THEN format(', %s::int AS priority, %s AS _always', s.priority,
                             CASE WHEN (identity_sync._named_contract_source(s.name)).id IS NULL THEN 'true' ELSE 'false' END)
                 ELSE '' END,
            cols, from_);
    END LOOP;
    RETURN nullif(array_to_string(branches, ' UNION ALL '), '');
END
$$;

-- The links of each person key, in the order of `keys`: a JSON array of [source, source key]
-- per key, for $4 of the several-sources person document (_from_clause, which unnests it beside
-- the keys $1); NULL with one default source.
CREATE FUNCTION identity_sync._links_of(keys text[]) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN identity_sync._several_sources() THEN ARRAY(
        SELECT coalesce((SELECT jsonb_agg(jsonb_build_array(l.source, l.source_key) ORDER BY l.source, l.source_key)
                           FROM identity_sync._person_link l WHERE l.person_key = k.k), '[]')::text
          FROM unnest(keys) WITH ORDINALITY AS k(k, o)
         ORDER BY k.o) END
$$;

-- One person out of several that a match joins: the one with accounts (the earliest account
-- first), else the one linked first. The others' links go to it; one that has accounts too is
-- a merge conflict: its accounts are left alone (merge_conflicts). Returns the kept key.
CREATE FUNCTION identity_sync._merge(keys text[]) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    keep text;
    other text;
BEGIN
    SELECT k INTO keep FROM unnest(keys) AS k
     ORDER BY (SELECT min(a.created_at) FROM identity_sync.account a WHERE a.person_key = k) NULLS LAST,
              (SELECT min(l.linked_at) FROM identity_sync._person_link l WHERE l.person_key = k) NULLS LAST, k
     LIMIT 1;
    FOR other IN SELECT DISTINCT k FROM unnest(keys) AS k WHERE k <> keep ORDER BY 1 LOOP
        UPDATE identity_sync._person_link SET person_key = keep WHERE person_key = other;
        IF EXISTS (SELECT FROM identity_sync.account a WHERE a.person_key = other)
           AND EXISTS (SELECT FROM identity_sync.account a WHERE a.person_key = keep) THEN
            INSERT INTO identity_sync._merge_conflict (person_key, merged_key, targets)
            SELECT keep, other, ARRAY(SELECT t.name FROM identity_sync.account a JOIN identity_sync.target t ON t.id = a.target_id
                                       WHERE a.person_key = other ORDER BY t.name)
            ON CONFLICT (merged_key) WHERE resolved_at IS NULL DO NOTHING;
            RAISE WARNING 'persons "%" and "%" are one person now, and both have accounts', keep, other
                USING DETAIL = format('"%s" keeps its accounts; those of "%s" are left as they are.', keep, other),
                      HINT = format('See identity_sync.merge_conflicts; SELECT identity_sync.resolve_merge_conflict(%L); retires them.', other);
        END IF;
        PERFORM identity_sync._audit('merge_persons', keep, to_jsonb(other), to_jsonb(keep));
    END LOOP;
    RETURN keep;
END
$$;

-- Link the records of person source `name` with keys `keys` (NULL: all of them): a record
-- met for the first time goes to the person of a record of another source the match rule
-- joins it with (several such persons are merged, _merge), else to a new person,
-- '<name>:<key>' (the default source's: its own key); a linked record that the rule now joins
-- with a record of another person merges the two. Returns the persons merges kept.
CREATE FUNCTION identity_sync._link_new(name text, keys text[]) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._named_person_source(name);
    rule text := (SELECT person_match FROM identity_sync._settings);
    present text[];
    pairs jsonb := '[]';
    k text;
    cur text;
    found text[];
    kept text[] := '{}';
BEGIN
    IF p.id IS NULL THEN
        RETURN kept;
    END IF;
    -- The source as identity_sync.run_as (src/evaluate.rs), like every read of a source.
    PERFORM identity_sync._use_user_search_path();
    present := identity_sync._evaluate(
        format('SELECT ARRAY(SELECT t.%1$I::text FROM %2$s AS t WHERE $1 IS NULL OR t.%1$I = ANY ($1::text[]::%3$s[]))',
               p.key_column, p.relation, identity_sync._column_type(p.relation, p.key_column, 'person key')),
        NULL::text[], ARRAY[format('person source %s', p.relation)], keys);
    IF cardinality(present) > 0 AND rule IS NOT NULL THEN
        pairs := identity_sync._evaluate(format(
            'SELECT coalesce(jsonb_agg(x), ''[]'') FROM ('
            'SELECT jsonb_build_array(a._key, b.source, b._key) AS x FROM (%1$s) AS a JOIN (%1$s) AS b ON a.source <> b.source AND (%2$s'
            || E'\n) WHERE a.source = $4[1] AND a._key = ANY ($1) UNION ALL '
            'SELECT jsonb_build_array(b._key, a.source, a._key) FROM (%1$s) AS a JOIN (%1$s) AS b ON a.source <> b.source AND (%2$s'
            || E'\n) WHERE b.source = $4[1] AND b._key = ANY ($1)) AS q',
            identity_sync._records_sql('person', false), rule),
            NULL::jsonb, ARRAY['person match'], present, NULL, NULL, ARRAY[name]);
    END IF;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    FOREACH k IN ARRAY present LOOP
        cur := (SELECT l.person_key FROM identity_sync._person_link l WHERE l.source = name AND l.source_key = k);
        found := ARRAY(SELECT DISTINCT l.person_key
                         FROM jsonb_array_elements(pairs) AS x
                         JOIN identity_sync._person_link l ON l.source = x->>1 AND l.source_key = x->>2
                        WHERE x->>0 = k AND l.person_key IS DISTINCT FROM cur);
        IF cur IS NULL THEN
            INSERT INTO identity_sync._person_link (source, source_key, person_key)
            VALUES (name, k, CASE WHEN cardinality(found) > 0 THEN identity_sync._merge(found)
                                  WHEN name = 'default' THEN k ELSE name || ':' || k END)
            -- (linked meanwhile by another session: the worker's claim and a configuration call)
            ON CONFLICT DO NOTHING;
        ELSIF cardinality(found) > 0 THEN
            kept := kept || identity_sync._merge(cur || found);
        END IF;
    END LOOP;
    RETURN kept;
END
$$;

-- Every record of every source linked, and merged where the match rule says so (_link_new, the
-- sources by priority). The persons merges kept are marked dirty.
CREATE FUNCTION identity_sync._link_all() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s identity_sync.source;
    kept text[] := '{}';
BEGIN
    FOR s IN SELECT * FROM identity_sync.source WHERE role = 'person' ORDER BY priority DESC NULLS LAST, id LOOP
        kept := kept || identity_sync._link_new(s.name, NULL);
    END LOOP;
    -- (a key kept by one merge and merged into another since has no links left)
    PERFORM identity_sync._replan(ARRAY(SELECT DISTINCT l.person_key FROM identity_sync._person_link l
                                         WHERE l.person_key = ANY (kept) ORDER BY 1), 'merge');
END
$$;

-- The person keys of the records `keys` of the source a captured change came from (the
-- planner's claim, _claim_changes, with several sources): records met for the first time are
-- linked (_link_new). A related source's keys are those of the highest-priority person source.
CREATE FUNCTION identity_sync._link_keys(source_id int, keys text[]) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    name text;
BEGIN
    SELECT * INTO src FROM identity_sync.source s WHERE s.id = source_id;
    IF src.id IS NULL THEN
        RETURN keys;   -- (a source dropped since: its keys as they are)
    END IF;
    name := CASE WHEN src.role = 'related' THEN (identity_sync._person_source()).name ELSE src.name END;
    PERFORM identity_sync._link_new(name, keys);   -- (the persons merges kept are among those returned)
    RETURN ARRAY(SELECT coalesce(l.person_key, CASE WHEN name = 'default' THEN k ELSE name || ':' || k END)
                   FROM unnest(keys) AS k
                   LEFT JOIN identity_sync._person_link l ON l.source = name AND l.source_key = k);
END
$$;

CREATE FUNCTION identity_sync.set_person_match(condition text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    recs text;
    q text;
    typ regtype;
BEGIN
    condition := nullif(btrim(condition), '');
    IF condition IS NOT NULL THEN
        PERFORM identity_sync._require_person_source();
        PERFORM identity_sync._check_single_expression('person match', condition);
        recs := identity_sync._records_sql('person', false);
        q := 'SELECT (' || condition || E'\n) AS v FROM (' || recs || ') AS a, (' || recs || ') AS b LIMIT 0';
        PERFORM identity_sync._use_user_search_path();
        typ := identity_sync._check_expression(q, 8, condition, 'person match');
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        IF typ <> 'boolean'::regtype THEN
            RAISE EXCEPTION 'person match must be boolean, not %', typ USING ERRCODE = 'datatype_mismatch',
                DETAIL = condition,
                HINT = 'Compare two records a and b of different person sources, e.g. a.national_id = b.national_id.';
        END IF;
        -- It joins two records: no aggregate, window or set-returning function (PostgreSQL
        -- refuses them in a join condition, where it runs).
        q := 'SELECT 1 FROM (' || recs || ') AS a JOIN (' || recs || ') AS b ON (';
        PERFORM identity_sync._use_user_search_path();
        PERFORM identity_sync._check_expression(q || condition || E'\n) LIMIT 0', length(q) + 1, condition, 'person match');
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    END IF;
    PERFORM identity_sync._set_setting('set_person_match', 'person_match', condition);
    IF identity_sync._several_sources() THEN
        PERFORM identity_sync._link_all();
    END IF;
END
$$;

-- Persons a match joined although both had accounts.
CREATE VIEW identity_sync.merge_conflicts AS
SELECT c.id, c.person_key, c.merged_key, c.targets, c.detected_at, c.resolved_at, c.resolution
  FROM identity_sync._merge_conflict c;

-- Resolve a merge conflict: the merged person's accounts are retired (planned like a leaver's:
-- disabled, deleted per the target's delete_after), the kept person keeps its own.
CREATE FUNCTION identity_sync.resolve_merge_conflict(merged_key text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c identity_sync._merge_conflict;
BEGIN
    PERFORM identity_sync._not_null(merged_key, 'the merged person key');
    UPDATE identity_sync._merge_conflict m SET resolved_at = now(), resolution = 'retire'
     WHERE m.merged_key = resolve_merge_conflict.merged_key AND m.resolved_at IS NULL
    RETURNING * INTO c;
    IF c.id IS NULL THEN
        RAISE EXCEPTION 'person "%" has no open merge conflict', merged_key USING ERRCODE = 'undefined_object',
            HINT = coalesce('Open conflicts: ' || (SELECT string_agg(format('%s (kept: %s)', m.merged_key, m.person_key), ', ' ORDER BY m.id)
                                                     FROM identity_sync._merge_conflict m WHERE m.resolved_at IS NULL) || '.',
                            'There is none (SELECT * FROM identity_sync.merge_conflicts;).');
    END IF;
    PERFORM identity_sync._replan(ARRAY[merged_key], 'merge_resolved');
    PERFORM identity_sync._audit('resolve_merge_conflict', merged_key, NULL, to_jsonb(c));
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.set_person_match(text) TO identity_sync_admin;
GRANT EXECUTE ON FUNCTION identity_sync.resolve_merge_conflict(text) TO identity_sync_operator;
GRANT SELECT ON identity_sync.merge_conflicts TO identity_sync_reader;

COMMENT ON FUNCTION identity_sync.set_person_match(text) IS 'Several person sources: SQL over two records a and b of different sources that are the same person (e.g. a.national_id = b.national_id); NULL = none.';
COMMENT ON VIEW identity_sync.merge_conflicts IS 'Persons a match joined although both had accounts: person_key keeps its accounts, those of merged_key wait for resolve_merge_conflict.';
COMMENT ON FUNCTION identity_sync.resolve_merge_conflict(text) IS 'Resolve a merge conflict: the merged person''s accounts are retired (disabled, then deleted per delete_after).';
