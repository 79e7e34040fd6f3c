-- Configuration: sources, settings, targets (option validation), mappings, rules, secrets.
--
-- Every function here is SECURITY DEFINER with a fixed search_path, executable by
-- identity_sync_admin only (see the end of this file), and records what it did in the audit log.
-- Identifiers from users are quoted with %I or taken as regclass; mapping and rule expressions
-- are the one place where user text becomes SQL: only admins can write them, and they are
-- evaluated as identity_sync.run_as (never a superuser), read-only (src/evaluate.rs).

------------------------------------------------------------------------------------------------
-- Sources
------------------------------------------------------------------------------------------------

-- Is the user text one SQL expression? It is placed inside a statement of ours ("SELECT (" text
-- ...), so a semicolon outside string literals, quoted identifiers, dollar quotes and comments
-- would end that statement and start another ("1); DROP TABLE x; SELECT (1"), a parenthesis it
-- did not open would close ours ("x) OR (true"), and an unterminated literal or comment would
-- swallow the SQL after it. The one check of this, for mappings, rules, owners, the login
-- expression and the primary contract order.
CREATE FUNCTION identity_sync._check_single_expression(what text, expr text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int := length(expr);
    i int := 1;
    j int;
    depth int;
    ch text;
    tag text;
    unterminated text;
    start int;
    opened int[] := '{}';
BEGIN
    WHILE i <= n LOOP
        start := i;
        ch := substr(expr, i, 1);
        IF ch IN ('''', '"') THEN
            -- a string literal or a quoted identifier: its quote doubled is a quote inside it,
            -- and so is \' in an E'' string
            j := i + 1;
            WHILE j <= n LOOP
                IF ch = '''' AND substr(expr, j, 1) = E'\\' AND i > 1 AND lower(substr(expr, i - 1, 1)) = 'e' THEN
                    j := j + 2;
                ELSIF substr(expr, j, 2) = ch || ch THEN
                    j := j + 2;
                ELSIF substr(expr, j, 1) = ch THEN
                    EXIT;
                ELSE
                    j := j + 1;
                END IF;
            END LOOP;
            IF j > n THEN
                unterminated := CASE ch WHEN '''' THEN 'string literal' ELSE 'quoted identifier' END;
                EXIT;
            END IF;
            i := j + 1;
        ELSIF substr(expr, i, 2) = '--' THEN
            j := strpos(substr(expr, i), E'\n');
            i := CASE WHEN j = 0 THEN n + 1 ELSE i + j END;
        ELSIF substr(expr, i, 2) = '/*' THEN
            -- block comments nest
            depth := 1;
            i := i + 2;
            WHILE i <= n AND depth > 0 LOOP
                IF substr(expr, i, 2) = '/*' THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF substr(expr, i, 2) = '*/' THEN
                    depth := depth - 1;
                    i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            IF depth > 0 THEN
                unterminated := '/* comment';
                EXIT;
            END IF;
        ELSIF ch = '$' AND (i = 1 OR substr(expr, i - 1, 1) !~ '[[:alnum:]_$]')
              AND substr(expr, i) ~ '^\$([[:alpha:]_][[:alnum:]_]*)?\$' THEN
            -- a dollar-quoted string, up to its closing tag
            tag := substring(substr(expr, i) FROM '^(\$(?:[[:alpha:]_][[:alnum:]_]*)?\$)');
            j := strpos(substr(expr, i + length(tag)), tag);
            IF j = 0 THEN
                unterminated := 'dollar-quoted string';
                EXIT;
            END IF;
            i := i + length(tag) + j - 1 + length(tag);
        ELSIF ch = ';' THEN
            RAISE EXCEPTION '% must be a single SQL %', what, CASE WHEN what LIKE '%query' THEN 'query' ELSE 'expression' END
                USING ERRCODE = 'syntax_error',
                DETAIL = format('The semicolon at character %s ends it: %s', i, expr),
                HINT = CASE WHEN what LIKE '%query' THEN 'Write one query without a semicolon.'
                            ELSE 'Write one expression without a semicolon; a subquery in parentheses is one expression.' END;
        ELSIF ch = '(' THEN
            opened := opened || i;
            i := i + 1;
        ELSIF ch = ')' THEN
            -- A parenthesis it did not open would close one of ours: "x) OR (true" would
            -- change the condition it is placed in.
            IF cardinality(opened) = 0 THEN
                RAISE EXCEPTION 'unbalanced parentheses in %', what USING ERRCODE = 'syntax_error',
                    DETAIL = format('The ) at character %s closes nothing: %s', i, expr);
            END IF;
            opened := opened[1:cardinality(opened) - 1];
            i := i + 1;
        ELSE
            i := i + 1;
        END IF;
    END LOOP;
    IF unterminated IS NULL AND cardinality(opened) > 0 THEN
        RAISE EXCEPTION 'unbalanced parentheses in %', what USING ERRCODE = 'syntax_error',
            DETAIL = format('The ( at character %s is never closed: %s', opened[cardinality(opened)], expr);
    END IF;
    -- Unterminated, it would swallow the SQL we put after the expression.
    IF unterminated IS NOT NULL THEN
        RAISE EXCEPTION 'unterminated % in %', unterminated, what USING ERRCODE = 'syntax_error',
            DETAIL = format('It starts at character %s: %s', start, expr);
    END IF;
END
$$;

-- User SQL (`what`) that must be given, and be one expression or query
-- (_check_single_expression): the first check of every expression and condition an admin
-- writes. `empty_hint`, if given, is the HINT when it is empty (an example).
CREATE FUNCTION identity_sync._check_user_text(what text, expr text, empty_hint text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (expr IS NULL OR btrim(expr) = '') AND empty_hint IS NULL THEN
        RAISE EXCEPTION '% is empty', what USING ERRCODE = 'invalid_parameter_value';
    ELSIF expr IS NULL OR btrim(expr) = '' THEN
        RAISE EXCEPTION '% is empty', what USING ERRCODE = 'invalid_parameter_value', HINT = empty_hint;
    END IF;
    PERFORM identity_sync._check_single_expression(what, expr);
END
$$;

-- An argument that must be given: NULL is an error naming it (a NULL would otherwise show up
-- as "<NULL>" in a message about something else).
CREATE FUNCTION identity_sync._not_null(value anyelement, what text) RETURNS anyelement
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '% must not be null', what USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN value;
END
$$;

-- A name a user gives to a source, target, rule, notification or product: not empty, and
-- printable (a newline in a name would forge lines wherever it is logged); for a new name, not
-- `taken` by another of its kind (`hint` then says what to do). Names are values, never pasted
-- into SQL.
CREATE FUNCTION identity_sync._check_name(what text, name text, taken boolean DEFAULT false, hint text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION '% name is empty', what USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION '% name contains a control character', what USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('The name is %s.', to_jsonb(name)),
            HINT = 'Names are one line of printable characters.';
    END IF;
    IF taken THEN
        RAISE EXCEPTION '% "%" already exists', what, name USING ERRCODE = 'duplicate_object', HINT = hint;
    END IF;
    RETURN name;
END
$$;

-- The type of a column, or an error naming the relation and listing its columns.
CREATE FUNCTION identity_sync._column_type(rel regclass, col text, what text)
RETURNS regtype LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t regtype;
BEGIN
    PERFORM identity_sync._not_null(col, format('the %s column', what));
    SELECT a.atttypid::regtype INTO t
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF t IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', col, rel
            USING ERRCODE = 'undefined_column',
                  DETAIL = format('It was given as the %s column.', what),
                  HINT = format('Columns of %s: %s.', rel,
                      (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum)
                         FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped));
    END IF;
    RETURN t;
END
$$;

-- May `rel` be registered as a source of `role` (person, contract, related)? Returns how it is
-- captured: 'trigger' (tables) or 'snapshot' (views, materialized views, foreign tables).
CREATE FUNCTION identity_sync._check_relation(rel regclass, role text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := (SELECT CASE WHEN c.relkind IN ('r', 'p') THEN 'trigger'
                                 WHEN c.relkind IN ('v', 'm', 'f') THEN 'snapshot' END
                       FROM pg_class c WHERE c.oid = rel);
BEGIN
    PERFORM identity_sync._not_null(rel, 'the relation');
    IF NOT has_table_privilege(session_user, rel, 'SELECT') THEN
        RAISE EXCEPTION 'permission denied for relation %', rel USING ERRCODE = 'insufficient_privilege',
            HINT = 'The role registering a source must be able to read it.';
    END IF;
    IF EXISTS (SELECT FROM identity_sync.source s WHERE s.relation = rel) THEN
        RAISE EXCEPTION 'relation % is already a source', rel USING ERRCODE = 'duplicate_object',
            HINT = format('Drop it first with identity_sync.drop_source(%L).', rel::text);
    END IF;
    IF role = 'related' THEN
        IF capture IS DISTINCT FROM 'trigger' THEN
            RAISE EXCEPTION 'related source % must be a table', rel USING ERRCODE = 'wrong_object_type',
                HINT = 'Related sources are captured by statement triggers; views and foreign tables cannot carry them.';
        END IF;
        PERFORM identity_sync._check_run_as_reads(rel);
        RETURN capture;
    END IF;
    IF capture IS NULL THEN
        RAISE EXCEPTION '% cannot be a source', rel USING ERRCODE = 'wrong_object_type',
            HINT = 'Sources are tables, partitioned tables, views, materialized views or foreign tables.';
    END IF;
    PERFORM identity_sync._check_run_as_reads(rel);
    RETURN capture;
END
$$;

-- The role user SQL runs as (identity_sync.run_as, src/evaluate.rs) must be able to read every
-- source: the planner reads them as that role.
CREATE FUNCTION identity_sync._check_run_as_reads(rel regclass) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._run_as();
    nsp regnamespace := (SELECT relnamespace FROM pg_class WHERE oid = rel);
BEGIN
    IF NOT has_schema_privilege(role, nsp, 'USAGE') OR NOT has_table_privilege(role, rel, 'SELECT') THEN
        RAISE EXCEPTION 'role "%" cannot read relation %', role, rel USING ERRCODE = 'insufficient_privilege',
            DETAIL = 'identity_sync reads sources and evaluates mappings, rules and other user SQL as this role (setting identity_sync.run_as), never as a superuser.',
            HINT = CASE WHEN has_schema_privilege(role, nsp, 'USAGE') THEN ''
                        ELSE format('GRANT USAGE ON SCHEMA %I TO %I; ', nsp, role) END
                   || format('GRANT SELECT ON %s TO %I;', rel, role);
    END IF;
END
$$;

-- Contracts are joined to their person by key (contract.person_key = person.key): the two key
-- columns must compare, whichever source is registered first.
CREATE FUNCTION identity_sync._check_key_types(person_rel regclass, person_key text,
                                               contract_rel regclass, contract_key text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF person_rel IS NULL OR contract_rel IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT FROM %s AS c JOIN %s AS p ON c.%I = p.%I LIMIT 0', contract_rel, person_rel, contract_key, person_key);
EXCEPTION WHEN undefined_function THEN
    RAISE EXCEPTION 'the person key of % cannot be compared with the person key of %', contract_rel, person_rel
        USING ERRCODE = 'datatype_mismatch',
              DETAIL = format('%s.%I is %s, %s.%I is %s.',
                              contract_rel, contract_key, identity_sync._column_type(contract_rel, contract_key, 'person key'),
                              person_rel, person_key, identity_sync._column_type(person_rel, person_key, 'person key')),
              HINT = 'Register a view that casts one of them to the type of the other.';
END
$$;

-- The person source: with several (15_sources.sql), the one of the highest priority.
CREATE FUNCTION identity_sync._person_source() RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source WHERE role = 'person' ORDER BY priority DESC NULLS LAST, id LIMIT 1
$$;

-- The contract source: with several, the first registered, whose starts and ends columns name
-- the dates of every contract in the person document.
CREATE FUNCTION identity_sync._contract_source() RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source WHERE role = 'contract' ORDER BY id LIMIT 1
$$;

-- The person source named `name` (NULL when there is none).
CREATE FUNCTION identity_sync._named_person_source(name text) RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source s WHERE s.role = 'person' AND s.name = _named_person_source.name
$$;

-- The contract source of the person source named `name` (NULL when there is none).
CREATE FUNCTION identity_sync._named_contract_source(name text) RETURNS identity_sync.source
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM identity_sync.source s WHERE s.role = 'contract' AND s.name = _named_contract_source.name
$$;

-- A source name given to add_person_source or add_contract_source: not empty, printable, and
-- without ':' (a person first seen in source s gets the key 's:<key>', which must say which).
CREATE FUNCTION identity_sync._check_source_name(name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._check_name('source', name);
    IF strpos(name, ':') > 0 THEN
        RAISE EXCEPTION 'source name "%" contains a colon', name USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'A person first seen in a source other than ''default'' gets the key <source>:<key>.',
            HINT = 'Name it with letters, digits, _ or -, e.g. ''contractors''.';
    END IF;
    RETURN name;
END
$$;

-- The person source, or an error: the person document (and self-service) needs one.
CREATE FUNCTION identity_sync._require_person_source() RETURNS identity_sync.source
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p identity_sync.source := identity_sync._person_source();
BEGIN
    IF p.id IS NULL THEN
        RAISE EXCEPTION 'no person source is registered' USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Register one first: SELECT identity_sync.add_person_source(''hr.employee'', ''emp_no'');';
    END IF;
    RETURN p;
END
$$;

-- Register a checked source: its row, its capture (triggers, or snapshots every minute), the
-- targets' queries compiled again (the person document changed; related sources leave it as it
-- is), and the audit log.
CREATE FUNCTION identity_sync._add_source(relation regclass, role text, capture text, key_column name DEFAULT NULL,
                                          starts_column name DEFAULT NULL, ends_column name DEFAULT NULL,
                                          affected text DEFAULT NULL, name text DEFAULT NULL, priority int DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
    t record;
    msg text;
    det text;
    code text;
BEGIN
    INSERT INTO identity_sync.source (relation, role, key_column, starts_column, ends_column, affected, capture, snapshot_interval,
                                      name, priority)
    VALUES (relation, role, key_column, starts_column, ends_column, affected, capture,
            CASE WHEN capture = 'snapshot' THEN interval '1 minute' END, name, priority)
    RETURNING * INTO src;
    PERFORM identity_sync._install_capture(src.id);
    IF role <> 'related' THEN
        -- Several person sources: their records are linked to persons (15_sources.sql) before
        -- the person document, which reads the links, is compiled.
        IF identity_sync._several_sources() THEN
            PERFORM identity_sync._check_several_sources();
            PERFORM identity_sync._link_all();
            -- The person document changed shape: say which target it breaks, and how.
            FOR t IN SELECT x.id, x.name FROM identity_sync.target x ORDER BY x.id LOOP
                BEGIN
                    PERFORM identity_sync._compile(t.id);
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, code = RETURNED_SQLSTATE;
                    RAISE EXCEPTION '% of target "%" does not compile with several person sources: %',
                                    coalesce(identity_sync._blame((SELECT x FROM identity_sync.target x WHERE x.id = t.id)), 'the mappings and rules'),
                                    t.name, msg
                        USING ERRCODE = code,
                              DETAIL = coalesce(nullif(det, ''), format('Source %s makes several person sources.', relation)),
                              HINT = 'With several person sources, persons and contracts are jsonb arrays of records, each with its source '
                                     '(README, Several sources): e.g. jsonb_array_elements(contracts) AS c ... c->>''dept_no'' instead of unnest(contracts).';
                END;
            END LOOP;
        END IF;
        PERFORM identity_sync._recompile_all();
    END IF;
    PERFORM identity_sync._audit('add_' || role || '_source', relation::text, NULL, to_jsonb(src));
END
$$;

CREATE FUNCTION identity_sync.add_person_source(relation regclass, key text, source text DEFAULT 'default',
                                                priority int DEFAULT 100)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := identity_sync._check_relation(relation, 'person');
    other identity_sync.source := identity_sync._named_person_source(identity_sync._check_source_name(source));
BEGIN
    PERFORM identity_sync._not_null(priority, 'the priority');
    IF other.id IS NOT NULL THEN
        RAISE EXCEPTION 'a person source named "%" is already registered: %', source, other.relation
            USING ERRCODE = 'duplicate_object',
                  HINT = format('Give this one another name (source => ''...''), or drop that one first with identity_sync.drop_source(%L).',
                                other.relation::text);
    END IF;
    PERFORM identity_sync._column_type(relation, key, 'person key');
    PERFORM identity_sync._check_key_types(relation, key, (identity_sync._named_contract_source(source)).relation,
                                           (identity_sync._named_contract_source(source)).key_column);
    IF capture = 'trigger' AND NOT EXISTS (
        SELECT FROM pg_index i
         WHERE i.indrelid = relation AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
           AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = relation AND attname = key))
    THEN
        RAISE EXCEPTION 'person key "%" of % is not backed by a primary key or unique index', key, relation
            USING ERRCODE = 'invalid_table_definition',
                  DETAIL = 'Every person must be one row, found by its key.',
                  HINT = format('CREATE UNIQUE INDEX ON %s (%I);', relation, key);
    END IF;
    PERFORM identity_sync._add_source(relation, 'person', capture, key_column => key, name => source, priority => priority);
END
$$;

CREATE FUNCTION identity_sync.add_contract_source(relation regclass, person_key text, starts text, ends text,
                                                  source text DEFAULT 'default')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := identity_sync._check_relation(relation, 'contract');
    other identity_sync.source := identity_sync._named_contract_source(identity_sync._not_null(source, 'the source name'));
    p identity_sync.source := identity_sync._named_person_source(source);
    t regtype;
    col text;
BEGIN
    -- Contracts belong to a person source by name; the default one may come first, as before.
    IF p.id IS NULL AND source <> 'default' THEN
        RAISE EXCEPTION 'person source "%" does not exist', source USING ERRCODE = 'undefined_object',
            DETAIL = 'A contract source names the person source whose persons its contracts belong to.',
            HINT = coalesce('The person sources: ' || (SELECT string_agg(format('%s (%s)', s.name, s.relation), ', ' ORDER BY s.id)
                                                       FROM identity_sync.source s WHERE s.role = 'person') || '.',
                            'Register it first with identity_sync.add_person_source(relation, key, source => ...).');
    END IF;
    IF other.id IS NOT NULL THEN
        RAISE EXCEPTION 'person source "%" already has a contract source: %', source, other.relation
            USING ERRCODE = 'duplicate_object',
                  HINT = format('There is one contract source per person source; drop it first with identity_sync.drop_source(%L), or register a view that unions your contract tables.',
                                other.relation::text);
    END IF;
    PERFORM identity_sync._column_type(relation, person_key, 'person key');
    PERFORM identity_sync._check_key_types(p.relation, p.key_column, relation, person_key);
    FOREACH t IN ARRAY ARRAY[identity_sync._column_type(relation, starts, 'starts'),
                             identity_sync._column_type(relation, ends, 'ends')] LOOP
        IF t NOT IN ('date'::regtype, 'timestamp'::regtype, 'timestamptz'::regtype) THEN
            RAISE EXCEPTION 'contract dates must be of type date or timestamp, not %', t
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = format('starts is %s, ends is %s.',
                                      identity_sync._column_type(relation, starts, 'starts'),
                                      identity_sync._column_type(relation, ends, 'ends'));
        END IF;
    END LOOP;
    IF capture = 'trigger' THEN
        -- The date-boundary check finds contracts starting or ending on a day by index.
        FOREACH col IN ARRAY ARRAY[starts, ends] LOOP
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%I)',
                           left(format('%s_%s_identity_sync', (SELECT relname FROM pg_class WHERE oid = relation), col), 63),
                           relation, col);
        END LOOP;
    END IF;
    PERFORM identity_sync._add_source(relation, 'contract', capture, key_column => person_key,
                                      starts_column => starts, ends_column => ends, name => source);
END
$$;

-- The start of a query probing a related source's affected query, which follows it: the query
-- as the capture trigger runs it (src/capture.rs), over an empty "changed".
CREATE FUNCTION identity_sync._affected_probe(relation regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('SELECT * FROM (WITH changed AS (SELECT * FROM %s LIMIT 0) ', relation)
$$;

CREATE FUNCTION identity_sync.add_related_source(relation regclass, affected text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    capture text := identity_sync._check_relation(relation, 'related');
    ncols int;
BEGIN
    IF affected IS NULL OR btrim(affected) = '' THEN
        RAISE EXCEPTION 'the affected query is empty' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Return the keys of the persons a change affects, e.g. SELECT emp_no FROM dept_emp JOIN changed USING (dept_no).';
    END IF;
    PERFORM identity_sync._check_single_expression('affected query', affected);
    -- The affected query must return exactly one column (any type casts to text).
    PERFORM identity_sync._use_user_search_path();
    ncols := identity_sync._check_query(identity_sync._affected_probe(relation) || affected || E'\n) AS a LIMIT 0',
                                        length(identity_sync._affected_probe(relation)), affected, 'affected query');
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF ncols <> 1 THEN
        RAISE EXCEPTION 'the affected query returns % columns, not one', ncols USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Return just the person key, e.g. SELECT emp_no FROM dept_emp JOIN changed USING (dept_no).';
    END IF;
    PERFORM identity_sync._add_source(relation, 'related', capture, affected => affected);
END
$$;

CREATE FUNCTION identity_sync.drop_source(relation regclass)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src identity_sync.source;
BEGIN
    PERFORM identity_sync._not_null(relation, 'the relation');
    SELECT * INTO src FROM identity_sync.source s WHERE s.relation = drop_source.relation;
    IF src.id IS NULL THEN
        RAISE EXCEPTION 'relation % is not a source', relation USING ERRCODE = 'undefined_object',
            HINT = 'SELECT relation, role FROM identity_sync.source; lists the sources.';
    END IF;
    PERFORM identity_sync._uninstall_capture(src.id);
    DELETE FROM identity_sync.source WHERE id = src.id;
    PERFORM identity_sync._recompile_all();
    PERFORM identity_sync._audit('drop_source', relation::text, to_jsonb(src), NULL);
END
$$;

------------------------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------------------------

-- Change one column of the settings row and record it in the audit log (action, old -> new).
CREATE FUNCTION identity_sync._set_setting(action text, setting text, value anyelement)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old jsonb;
BEGIN
    EXECUTE format('SELECT to_jsonb(%I) FROM identity_sync._settings', setting) INTO old;
    EXECUTE format('UPDATE identity_sync._settings SET %I = $1', setting) USING value;
    PERFORM identity_sync._audit(action, NULL, old, to_jsonb(value));
END
$$;

CREATE FUNCTION identity_sync.set_search_path(path text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    item text;
BEGIN
    PERFORM identity_sync._not_null(path, 'the search path');
    PERFORM set_config('search_path', path, true);   -- rejects a malformed list
    -- PostgreSQL skips a schema that does not exist; here it is a typo to report.
    FOR item IN SELECT btrim(x) FROM unnest(string_to_array(path, ',')) AS x LOOP
        CONTINUE WHEN item IN ('', '$user', 'pg_temp', 'pg_catalog');
        IF to_regnamespace(item) IS NULL THEN
            RAISE EXCEPTION 'schema % does not exist', CASE WHEN left(item, 1) = '"' THEN item ELSE '"' || item || '"' END
                USING ERRCODE = 'invalid_schema_name',
                DETAIL = format('It is named in the search path %s.', quote_literal(path));
        END IF;
    END LOOP;
    PERFORM identity_sync._set_setting('set_search_path', 'search_path', path);
    PERFORM identity_sync._recompile_all();          -- expressions must still resolve
    PERFORM identity_sync._uninstall_capture(id), identity_sync._install_capture(id)
       FROM identity_sync.source WHERE role = 'related';
END
$$;

CREATE FUNCTION identity_sync.set_primary_contract(order_by text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q text;
BEGIN
    order_by := nullif(btrim(order_by), '');
    IF order_by IS NOT NULL THEN
        PERFORM identity_sync._check_single_expression('primary contract order', order_by);
    END IF;
    PERFORM identity_sync._set_setting('set_primary_contract', 'primary_contract_order', order_by);
    -- Validate against the person document query, with the position of an error inside the
    -- order (it is the ORDER BY of the primary contract's subquery); an error rolls the change
    -- back.
    q := 'SELECT count(*) ' || identity_sync._from_clause();
    PERFORM identity_sync._use_user_search_path();
    BEGIN
        PERFORM identity_sync._check_query(q, coalesce(nullif(strpos(q, 'ORDER BY ' || order_by || ' LIMIT 1'), 0) + 8, 0),
                                           coalesce(order_by, identity_sync._primary_contract_order()), 'primary contract order');
    EXCEPTION WHEN grouping_error THEN
        RAISE EXCEPTION 'aggregate functions are not allowed in the primary contract order' USING ERRCODE = 'grouping_error',
            DETAIL = format('The order is %s.', order_by),
            HINT = 'Order by columns of contract and today, e.g. contract.to_date DESC, contract.from_date DESC.';
    END;
    PERFORM identity_sync._evaluate(q, NULL::bigint, ARRAY['primary contract order'], '{}'::text[], CURRENT_DATE, 0);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    PERFORM identity_sync._recompile_all();
END
$$;

CREATE FUNCTION identity_sync.set_clock(at timestamptz)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._set_setting('set_clock', 'clock', at);
    PERFORM identity_sync._wake_at_commit();
END
$$;

------------------------------------------------------------------------------------------------
-- Targets
------------------------------------------------------------------------------------------------

-- The options a target accepts: name, kinds, type.
CREATE FUNCTION identity_sync._target_options()
RETURNS TABLE (option text, kinds text[], type text, meaning text)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('auth',                  '{scim,webhook}'::text[], 'auth',      'none, bearer, basic or oauth2; the secret comes from set_secret'),
           ('username',              '{scim,webhook}',       'text',      'user name for basic auth'),
           ('token_url',             '{scim,webhook}',       'text',      'OAuth2 token endpoint'),
           ('client_id',             '{scim,webhook}',       'text',      'OAuth2 client id'),
           ('scope',                 '{scim,webhook}',       'text',      'OAuth2 scope'),
           ('secret_file',           '{scim,webhook}',       'path',      'absolute path of a file the server can read holding the secret, read at each use (never in SQL text); wins over set_secret'),
           ('ca_file',               '{scim,webhook}',       'path',      'absolute path of a PEM file with the certificates of a private CA to trust'),
           ('allow_insecure_http',   '{scim,webhook}',       'boolean',   'allow plain http to a host that is not a loopback address (default false)'),
           ('max_response_bytes',    '{scim,webhook}',       'integer',   'a larger response body fails the request, default 1048576'),
           ('timeout',               '{scim,webhook}',       'interval',  'per request, default 10 s'),
           ('max_concurrency',       '{scim,webhook}',       'integer',   'requests in flight, default 16'),
           ('correlate_on',          '{scim}',               'text',      'attribute used to find an existing account before creating'),
           ('create_groups',         '{scim}',               'boolean',   'create groups that do not exist yet'),
           ('create_before',         '{scim,webhook,table}', 'interval',  'create the account this long before the first start'),
           ('enable_before',         '{scim,webhook,table}', 'interval',  'enable the account this long before a start'),
           ('disable_after',         '{scim,webhook,table}', 'interval',  'disable the account this long after the last end'),
           ('delete_after',          '{scim,webhook,table}', 'interval?', 'delete the account this long after the last end; null = never'),
           ('max_creates',           '{scim,webhook,table}', 'threshold', 'creates per plan before the target is held: a count or a percentage of accounts'),
           ('max_disables',          '{scim,webhook,table}', 'threshold', 'disables per plan before the target is held'),
           ('max_deletes',           '{scim,webhook,table}', 'threshold', 'deletes per plan before the target is held'),
           ('dry_run',               '{scim,webhook,table}', 'boolean',   'plan and record, never send'),
           ('out_of_scope',          '{scim,webhook,table}', 'out_of_scope', 'what happens to the account of a person no rule matches any more: disable (default), keep (left as it is) or delete'),
           ('quarantine_after',      '{scim,webhook,table}', 'interval',  'how long every request (5 at least) must have failed before the target is quarantined and probed, default 1 minute'),
           ('unique_max_iterations', '{scim,webhook,table}', 'integer',   'cap for is_unique iterations, default 99'),
           ('statement_timeout',     '{scim,webhook,table}', 'interval',  'bound of each evaluation of the mappings and rules, default identity_sync.statement_timeout (30 s)'),
           ('orphans',               '{scim,table}',         'orphans',   'what repair does with accounts of nobody: report (default), disable or delete'),
           ('adopt',                 '{scim,table}',         'boolean',   'the next resync scans the target first and links existing accounts by correlate_on'),
           ('reconcile_every',       '{scim,table}',         'interval?', 'the worker reconciles the target this often; null = never'),
           ('reconcile_mode',        '{scim,table}',         'reconcile_mode', 'what a scheduled reconcile does: report (default) or repair'),
           ('relation',              '{table}',              'regclass',  'the table (or foreign table) written'),
           ('key_column',            '{table}',              'text',      'its column holding the person key'),
           ('active_column',         '{table}',              'text',      'its boolean column holding the active flag'),
           ('groups_relation',       '{table}',              'regclass',  'a membership table (or foreign table) with the key column and group_column: one row per granted group'),
           ('group_column',          '{table}',              'text',      'the column of groups_relation holding the group name, default group_name')
$$;

-- The bound of one evaluation of a target's mappings and rules, in milliseconds (option
-- statement_timeout, else the setting identity_sync.statement_timeout), and what sets it.
CREATE FUNCTION identity_sync._statement_timeout_ms(options jsonb) RETURNS int
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT least(ceil(extract(epoch FROM coalesce((options->>'statement_timeout')::interval,
                                                   identity_sync._statement_timeout())) * 1000),
                 2147483647)::int
$$;

CREATE FUNCTION identity_sync._statement_timeout_setting(t identity_sync.target) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN t.options ? 'statement_timeout'
                THEN format('the option statement_timeout of target "%s"', t.name)
                ELSE 'identity_sync.statement_timeout' END
$$;

CREATE FUNCTION identity_sync._validate_options(kind text, url text, options jsonb)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o record;
    spec record;
    v jsonb;
    valid text;
    rel regclass;
BEGIN
    PERFORM identity_sync._not_null(kind, 'the target kind');
    IF kind NOT IN ('scim', 'webhook', 'table') THEN
        RAISE EXCEPTION 'invalid target kind "%"', kind USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The kinds are scim, webhook and table.';
    END IF;
    IF jsonb_typeof(options) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'target options must be a JSON object, not %', coalesce(jsonb_typeof(options), 'null')
            USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example {"timeout": "5 s", "dry_run": true}.';
    END IF;
    IF kind IN ('scim', 'webhook') AND (url IS NULL OR url !~* '^https?://[^/]') THEN
        RAISE EXCEPTION 'a % target needs an http or https url', kind USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('url is %s.', coalesce(quote_literal(url), 'null'));
    END IF;
    -- Plain http can be overheard (tokens, personal data): loopback only, unless the target
    -- says otherwise. The worker's HTTP client refuses it too (core/src/deliver/client.rs).
    IF kind IN ('scim', 'webhook') AND url ~* '^http://'
       AND NOT coalesce((options->>'allow_insecure_http')::boolean, false)
       AND NOT identity_sync._is_loopback_url(url) THEN
        RAISE EXCEPTION 'plain http to a host that is not a loopback address is refused'
            USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Tokens and personal data would cross the network unencrypted.',
            HINT = 'Use an https url, or set the option {"allow_insecure_http": true}.';
    END IF;
    IF kind = 'table' AND url IS NOT NULL THEN
        RAISE EXCEPTION 'a table target has no url' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Name the table in the options: {"relation": "app.users", "key_column": "person_key"}.';
    END IF;
    FOR o IN SELECT * FROM jsonb_each(options) LOOP
        SELECT * INTO spec FROM identity_sync._target_options() t WHERE t.option = o.key AND kind = ANY (t.kinds);
        IF NOT FOUND THEN
            SELECT string_agg(t.option, ', ' ORDER BY t.option) INTO valid
              FROM identity_sync._target_options() t WHERE kind = ANY (t.kinds);
            RAISE EXCEPTION 'unknown option "%" for a % target', o.key, kind USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Valid options: ' || valid || '.';
        END IF;
        v := o.value;
        BEGIN
            CASE spec.type
            WHEN 'text' THEN
                IF jsonb_typeof(v) <> 'string' THEN RAISE EXCEPTION USING MESSAGE = 'a string'; END IF;
            WHEN 'auth' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('none', 'bearer', 'basic', 'oauth2') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of none, bearer, basic, oauth2';
                END IF;
            WHEN 'out_of_scope' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('disable', 'keep', 'delete') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of disable, keep, delete';
                END IF;
            WHEN 'orphans' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('report', 'disable', 'delete') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of report, disable, delete';
                END IF;
            WHEN 'reconcile_mode' THEN
                IF jsonb_typeof(v) <> 'string' OR v->>0 NOT IN ('report', 'repair') THEN
                    RAISE EXCEPTION USING MESSAGE = 'one of report, repair';
                END IF;
            WHEN 'boolean' THEN
                IF jsonb_typeof(v) <> 'boolean' THEN RAISE EXCEPTION USING MESSAGE = 'true or false'; END IF;
            WHEN 'path' THEN
                IF jsonb_typeof(v) <> 'string' OR left(v->>0, 1) <> '/' THEN
                    RAISE EXCEPTION USING MESSAGE = 'an absolute file path';
                END IF;
            WHEN 'integer' THEN
                IF jsonb_typeof(v) <> 'number' OR (v->>0)::numeric <> trunc((v->>0)::numeric) OR (v->>0)::numeric < 1 THEN
                    RAISE EXCEPTION USING MESSAGE = 'a positive whole number';
                END IF;
            WHEN 'interval', 'interval?' THEN
                IF jsonb_typeof(v) = 'null' AND spec.type = 'interval?' THEN
                    NULL;
                ELSIF jsonb_typeof(v) NOT IN ('string', 'number') THEN
                    RAISE EXCEPTION USING MESSAGE = 'an interval such as ''30 days''';
                ELSIF o.key IN ('timeout', 'quarantine_after', 'reconcile_every', 'statement_timeout')
                      AND (v->>0)::interval <= interval '0' THEN
                    -- a request, a quarantine, a schedule or an evaluation of no time at all
                    RAISE EXCEPTION USING MESSAGE = 'a positive interval such as ''30 s''';
                ELSIF (v->>0)::interval < interval '0' THEN
                    RAISE EXCEPTION USING MESSAGE = 'an interval of 0 or more such as ''30 days''';
                END IF;
            WHEN 'threshold' THEN
                PERFORM identity_sync._threshold(v);
            WHEN 'regclass' THEN
                IF jsonb_typeof(v) <> 'string' THEN RAISE EXCEPTION USING MESSAGE = 'a table name'; END IF;
                -- Resolved as the user writes it (their search_path), stored schema-qualified:
                -- the worker and our functions run with search_path = pg_catalog, pg_temp.
                PERFORM identity_sync._use_user_search_path();
                rel := (v->>0)::regclass;
                PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
                options := jsonb_set(options, ARRAY[o.key], to_jsonb(rel::text));
            END CASE;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'invalid value for option "%": %', o.key, v::text USING ERRCODE = 'invalid_parameter_value',
                -- (what the checks above raise says what was expected; PostgreSQL's own errors,
                -- such as an invalid interval, are shown as they are)
                DETAIL = CASE WHEN SQLSTATE = 'P0001' THEN 'Expected ' || SQLERRM || '.' ELSE SQLERRM END,
                HINT = format('%s: %s.', o.key, spec.meaning);
        END;
    END LOOP;
    IF options->>'auth' = 'basic' AND options->>'username' IS NULL THEN
        RAISE EXCEPTION 'option auth basic needs username' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example {"auth": "basic", "username": "provisioning"}; the password comes from set_secret or secret_file.';
    END IF;
    IF options->>'auth' = 'oauth2' AND (options->>'token_url' IS NULL OR options->>'client_id' IS NULL) THEN
        RAISE EXCEPTION 'option auth oauth2 needs token_url and client_id' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'For example {"auth": "oauth2", "token_url": "https://idp.example/oauth2/token", "client_id": "identity-sync"}; the client secret comes from set_secret or secret_file.';
    END IF;
    IF options ? 'token_url' AND (options->>'token_url' !~* '^https?://[^/]'
       OR (options->>'token_url' ~* '^http://' AND NOT coalesce((options->>'allow_insecure_http')::boolean, false)
           AND NOT identity_sync._is_loopback_url(options->>'token_url'))) THEN
        RAISE EXCEPTION 'invalid value for option "token_url": %', options->'token_url' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Expected an https url, or plain http to a loopback address (or with {"allow_insecure_http": true}).';
    END IF;
    IF kind = 'scim' AND options ? 'correlate_on' THEN
        PERFORM identity_sync._check_attribute_path(options->>'correlate_on');
    END IF;
    IF kind = 'scim' AND coalesce((options->>'adopt')::boolean, false) AND options->>'correlate_on' IS NULL THEN
        RAISE EXCEPTION 'option adopt needs correlate_on' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Existing accounts are linked to persons by the value of the correlate_on attribute.',
            HINT = 'Set correlate_on too, e.g. {"adopt": true, "correlate_on": "externalId"}.';
    END IF;
    IF kind = 'table' THEN
        IF options->>'relation' IS NULL OR options->>'key_column' IS NULL THEN
            RAISE EXCEPTION 'a table target needs the options relation and key_column' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'For example {"relation": "app.users", "key_column": "person_key", "active_column": "active"}.';
        END IF;
        PERFORM identity_sync._column_type((options->>'relation')::regclass, options->>'key_column', 'key');
        IF options ? 'active_column' AND identity_sync._column_type((options->>'relation')::regclass, options->>'active_column', 'active') <> 'boolean'::regtype THEN
            RAISE EXCEPTION 'active_column "%" must be boolean', options->>'active_column' USING ERRCODE = 'datatype_mismatch',
                DETAIL = format('Column %I of %s is %s.', options->>'active_column', options->>'relation',
                                identity_sync._column_type((options->>'relation')::regclass, options->>'active_column', 'active'));
        END IF;
        IF options ? 'group_column' AND NOT options ? 'groups_relation' THEN
            RAISE EXCEPTION 'option group_column needs groups_relation' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'For example {"groups_relation": "app.user_groups", "group_column": "group_name"}.';
        END IF;
        IF options ? 'groups_relation' THEN
            -- Memberships are rows (key, group) of groups_relation, keyed like the relation.
            PERFORM identity_sync._column_type((options->>'groups_relation')::regclass, options->>'key_column', 'key_column');
            PERFORM identity_sync._column_type((options->>'groups_relation')::regclass,
                                               coalesce(options->>'group_column', 'group_name'), 'group_column');
        END IF;
    END IF;
    RETURN options;
END
$$;

CREATE FUNCTION identity_sync._target(name text) RETURNS identity_sync.target
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT identity_sync._by_name(NULL::identity_sync.target, identity_sync._not_null(name, 'the target name'),
                                  'Create one with identity_sync.add_target().')
$$;

CREATE FUNCTION identity_sync.add_target(name text, kind text, url text DEFAULT NULL, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target;
BEGIN
    PERFORM identity_sync._check_name('target', name, EXISTS (SELECT FROM identity_sync.target WHERE target.name = add_target.name),
                                      'Change it with identity_sync.alter_target(), or drop it first.');
    INSERT INTO identity_sync.target (name, kind, url, options)
    VALUES (name, kind, url, identity_sync._validate_options(kind, url, coalesce(options, '{}')))
    RETURNING * INTO t;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('add_target', name, NULL, to_jsonb(t) - 'compiled');
    RAISE NOTICE 'target "%" has no rules yet, so nobody is in scope', name
        USING HINT = 'Add mappings with identity_sync.map() and rules with identity_sync.add_rule(), then start the initial sync with identity_sync.resync().';
END
$$;

-- NULL arguments mean "unchanged"; options are merged (a key set to null is removed).
CREATE FUNCTION identity_sync.alter_target(name text, url text DEFAULT NULL, options jsonb DEFAULT NULL, new_name text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(name);
    merged jsonb := t.options;
    n identity_sync.target;
BEGIN
    IF new_name IS NOT NULL THEN
        PERFORM identity_sync._check_name('target', new_name, EXISTS (SELECT FROM identity_sync.target WHERE target.name = new_name AND target.id <> t.id),
                                          'Choose another name, or drop that target first.');
    END IF;
    IF options IS NOT NULL THEN
        merged := jsonb_strip_nulls(t.options || options);
        IF options ? 'delete_after' AND options->'delete_after' = 'null' THEN
            merged := merged - 'delete_after';
        END IF;
    END IF;
    UPDATE identity_sync.target
       SET url = coalesce(alter_target.url, target.url),
           options = identity_sync._validate_options(t.kind, coalesce(alter_target.url, t.url), merged),
           name = coalesce(new_name, target.name),
           updated_at = now()
     WHERE id = t.id RETURNING * INTO n;
    PERFORM identity_sync._compile(t.id);
    -- New lifecycle intervals move moments that may already lie behind the date-boundary check
    -- (a delete_after set for leavers of last year): plan the target's accounts again now.
    -- So does a new choice for accounts out of scope.
    IF EXISTS (SELECT FROM unnest(ARRAY['create_before', 'enable_before', 'disable_after', 'delete_after', 'out_of_scope']) AS k
                WHERE t.options->k IS DISTINCT FROM n.options->k) THEN
        INSERT INTO identity_sync._dirty (person_key, target_id, op, first_at)
        SELECT a.person_key, t.id, 'lifecycle', now() FROM identity_sync.account a
         WHERE a.target_id = t.id AND a.planned_state <> 'deleted'
        ON CONFLICT DO NOTHING;
    END IF;
    -- A new membership table gets every membership the registry knows: the accounts' groups are
    -- planned again as grants (writing a membership that is there already changes nothing).
    IF n.options->>'groups_relation' IS NOT NULL
       AND (t.options->'groups_relation' IS DISTINCT FROM n.options->'groups_relation'
            OR t.options->'group_column' IS DISTINCT FROM n.options->'group_column') THEN
        UPDATE identity_sync.account a SET planned_groups = '{}', groups = '{}'
         WHERE a.target_id = t.id AND a.planned_state IN ('active', 'disabled') AND a.planned_groups <> '{}';
        INSERT INTO identity_sync._dirty (person_key, target_id, op, first_at)
        SELECT a.person_key, t.id, 'groups_relation', now() FROM identity_sync.account a
         WHERE a.target_id = t.id AND a.planned_state IN ('active', 'disabled')
        ON CONFLICT DO NOTHING;
    END IF;
    PERFORM identity_sync._audit('alter_target', n.name, to_jsonb(t) - 'compiled', to_jsonb(n) - 'compiled');
    PERFORM identity_sync._wake_at_commit();
END
$$;

CREATE FUNCTION identity_sync.drop_target(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(name);
BEGIN
    -- The worker writes these rows (events, accounts, the target) in its own order: it steps
    -- aside until this transaction ends (40_deliver.sql, src/deliver/txn.rs).
    PERFORM identity_sync._exclude_worker();
    DELETE FROM identity_sync.event WHERE target_id = t.id;
    DELETE FROM identity_sync.account WHERE target_id = t.id;
    DELETE FROM identity_sync._unique WHERE target_id = t.id;
    DELETE FROM identity_sync._plan_error WHERE target_id = t.id;
    DELETE FROM identity_sync._dirty WHERE target_id = t.id;
    DELETE FROM identity_sync._deferred WHERE target_id = t.id;
    DELETE FROM identity_sync._remote x USING identity_sync.reconcile_run r WHERE x.run_id = r.id AND r.target_id = t.id;
    DELETE FROM identity_sync._finding WHERE target_id = t.id;
    DELETE FROM identity_sync.reconcile_run WHERE target_id = t.id;
    DELETE FROM identity_sync.target WHERE id = t.id;
    PERFORM identity_sync._audit('drop_target', name, to_jsonb(t) - 'compiled', NULL);
END
$$;

CREATE FUNCTION identity_sync.set_secret(target text, secret text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
BEGIN
    IF secret IS NULL OR secret = '' THEN
        DELETE FROM identity_sync._secret WHERE target_id = t.id;
    ELSE
        INSERT INTO identity_sync._secret (target_id, secret) VALUES (t.id, secret)
        ON CONFLICT (target_id) DO UPDATE SET secret = excluded.secret, set_at = now();
    END IF;
    -- The secret itself is never recorded.
    PERFORM identity_sync._audit('set_secret', target, NULL, jsonb_build_object('set', secret IS NOT NULL AND secret <> ''));
    PERFORM identity_sync._wake_at_commit();
END
$$;

------------------------------------------------------------------------------------------------
-- Mappings and rules (compiled into one query per target by 30_plan/10_compile.sql)
------------------------------------------------------------------------------------------------

-- An expression gives one value for each person (each row of the query it is compiled into):
-- an aggregate, a window function or a set-returning function at its top level would change the
-- rows of that query. PostgreSQL refuses all three in WHERE, so an expression that passed as a
-- select-list item is checked there once more; `probe` is a query ending in WHERE or AND.
-- (`what`: "mapping expression", "rule condition", …)
CREATE FUNCTION identity_sync._check_one_value(what text, probe text, expr text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    msg text;
    detail text;
    code text;
BEGIN
    PERFORM identity_sync._use_user_search_path();
    PERFORM identity_sync._check_expression(probe || ' (' || expr || E'\n) IS NULL LIMIT 0', length(probe) + 2, expr, what);
EXCEPTION WHEN grouping_error OR windowing_error OR feature_not_supported THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL, code = RETURNED_SQLSTATE;
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = regexp_replace(msg, ' in WHERE$', ' in the ' || what),
        DETAIL = detail,
        HINT = 'It gives one value each time it is evaluated: aggregate, or pick one row, in a subquery such as (SELECT max(c.ends) FROM unnest(contracts) AS c).';
END
$$;

-- Probe a user expression (`what`, checked by _check_user_text) over the FROM clause `from_clause`
-- as identity_sync.run_as, read-only, in the user's search_path: its type, with the position
-- of any error inside the expression (_check_expression in src/config/), and one value each
-- time (_check_one_value: `from_clause` || `joiner` takes the expression as a condition,
-- ' WHERE', or ' AND' after a WHERE of its own). Build `from_clause` before (names are then
-- qualified). The one probe of mapping expressions, rule conditions, owners conditions and
-- notification expressions.
CREATE FUNCTION identity_sync._probe_user_expression(what text, expr text, from_clause text, joiner text)
RETURNS regtype LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    typ regtype;
BEGIN
    PERFORM identity_sync._use_user_search_path();
    typ := identity_sync._check_expression('SELECT (' || expr || E'\n) AS v ' || from_clause || ' LIMIT 0', 8, expr, what);
    PERFORM identity_sync._check_one_value(what, 'SELECT 1 ' || from_clause || joiner, expr);
    RETURN typ;
END
$$;

-- Check one user expression (`what`: mapping expression, rule condition) in the context of a
-- target; returns its type.
CREATE FUNCTION identity_sync._check_user_expression(t identity_sync.target, expr text, what text DEFAULT 'expression')
RETURNS regtype LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM identity_sync._check_user_text(what, expr);
    RETURN identity_sync._probe_user_expression(what, expr, identity_sync._from_clause(t.options), ' AND');
END
$$;

CREATE FUNCTION identity_sync.map(target text, attribute text, expression text,
                                  on_create_only boolean DEFAULT false, is_unique boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    old identity_sync.mapping;
    m identity_sync.mapping;
BEGIN
    IF attribute IS NULL OR btrim(attribute) = '' THEN
        RAISE EXCEPTION 'attribute name is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF t.kind = 'scim' THEN
        PERFORM identity_sync._check_attribute_path(attribute);
    ELSIF t.kind = 'table' THEN
        PERFORM identity_sync._column_type((t.options->>'relation')::regclass, attribute, 'mapped attribute');
    END IF;
    IF is_unique AND expression !~* '\miteration\M' THEN
        RAISE NOTICE 'unique attribute "%" does not use iteration', attribute
            USING HINT = 'Without it a taken value cannot be varied, e.g. slug(...) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '''' END.';
    END IF;
    -- A bare literal ('en-US') has no type yet; as an attribute value it is text.
    IF identity_sync._check_user_expression(t, expression, 'mapping expression') = 'unknown'::regtype THEN
        expression := format('(%s)::text', expression);
    END IF;
    SELECT * INTO old FROM identity_sync.mapping WHERE mapping.target_id = t.id AND mapping.attribute = map.attribute;
    INSERT INTO identity_sync.mapping (target_id, attribute, expression, on_create_only, is_unique)
    VALUES (t.id, attribute, expression, on_create_only, is_unique)
    ON CONFLICT ON CONSTRAINT mapping_pkey DO UPDATE
       SET expression = excluded.expression, on_create_only = excluded.on_create_only, is_unique = excluded.is_unique
    RETURNING * INTO m;
    PERFORM identity_sync._compile(t.id);
    -- A first mapping has no old value (to_jsonb of the empty record would be all nulls).
    PERFORM identity_sync._audit('map', target || '.' || attribute,
                                 CASE WHEN old.target_id IS NOT NULL THEN to_jsonb(old) - 'position' END,
                                 to_jsonb(m) - 'position');
END
$$;

CREATE FUNCTION identity_sync.unmap(target text, attribute text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    old identity_sync.mapping;
BEGIN
    DELETE FROM identity_sync.mapping WHERE mapping.target_id = t.id AND mapping.attribute = unmap.attribute
    RETURNING * INTO old;
    IF old.target_id IS NULL THEN
        RAISE EXCEPTION 'target "%" has no mapping for attribute "%"', target, attribute USING ERRCODE = 'undefined_object',
            HINT = coalesce('Its mapped attributes: ' || (SELECT string_agg(m.attribute, ', ' ORDER BY m.position)
                                                           FROM identity_sync.mapping m WHERE m.target_id = t.id) || '.',
                            'It has no mappings.');
    END IF;
    DELETE FROM identity_sync._unique WHERE _unique.target_id = t.id AND _unique.attribute = unmap.attribute;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('unmap', target || '.' || attribute, to_jsonb(old) - 'position', NULL);
END
$$;

CREATE FUNCTION identity_sync.add_rule(target text, name text, condition text, groups text[] DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    typ regtype;
    r identity_sync.rule;
BEGIN
    PERFORM identity_sync._check_name('rule', name);
    IF EXISTS (SELECT FROM identity_sync.rule WHERE rule.target_id = t.id AND rule.name = add_rule.name) THEN
        RAISE EXCEPTION 'target "%" already has a rule "%"', target, name USING ERRCODE = 'duplicate_object',
            HINT = 'Drop it first with identity_sync.drop_rule().';
    END IF;
    IF EXISTS (SELECT FROM unnest(groups) AS g WHERE g IS NULL OR btrim(g) = '') THEN
        RAISE EXCEPTION 'group names must not be empty' USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('groups is %s.', groups);
    END IF;
    typ := identity_sync._check_user_expression(t, condition, 'rule condition');
    IF typ <> 'boolean'::regtype THEN
        RAISE EXCEPTION 'rule condition must be boolean, not %', typ USING ERRCODE = 'datatype_mismatch',
            DETAIL = condition;
    END IF;
    INSERT INTO identity_sync.rule (target_id, name, condition, groups)
    VALUES (t.id, name, condition, coalesce(groups, '{}')) RETURNING * INTO r;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('add_rule', target || '.' || name, NULL, to_jsonb(r));
END
$$;

CREATE FUNCTION identity_sync.drop_rule(target text, name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t identity_sync.target := identity_sync._target(target);
    old identity_sync.rule;
BEGIN
    DELETE FROM identity_sync.rule WHERE rule.target_id = t.id AND rule.name = drop_rule.name RETURNING * INTO old;
    IF old.target_id IS NULL THEN
        RAISE EXCEPTION 'target "%" has no rule "%"', target, name USING ERRCODE = 'undefined_object',
            HINT = coalesce('Its rules: ' || (SELECT string_agg(r.name, ', ' ORDER BY r.name)
                                               FROM identity_sync.rule r WHERE r.target_id = t.id) || '.',
                            'It has no rules.');
    END IF;
    PERFORM identity_sync._compile(t.id);
    PERFORM identity_sync._audit('drop_rule', target || '.' || name, to_jsonb(old), NULL);
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

-- Admins: configuration.
GRANT EXECUTE ON FUNCTION identity_sync.add_person_source(regclass, text, text, integer),
                          identity_sync.add_contract_source(regclass, text, text, text, text),
                          identity_sync.add_related_source(regclass, text),
                          identity_sync.drop_source(regclass),
                          identity_sync.set_primary_contract(text),
                          identity_sync.set_search_path(text),
                          identity_sync.set_clock(timestamptz),
                          identity_sync.add_target(text, text, text, jsonb),
                          identity_sync.alter_target(text, text, jsonb, text),
                          identity_sync.drop_target(text),
                          identity_sync.set_secret(text, text),
                          identity_sync.map(text, text, text, boolean, boolean),
                          identity_sync.unmap(text, text),
                          identity_sync.add_rule(text, text, text, text[]),
                          identity_sync.drop_rule(text, text)
   TO identity_sync_admin;
-- The text helpers of mapping expressions (written in Rust, src/config/; lib.rs makes them come
-- before this file), for readers and for the role user SQL runs as (identity_sync.run_as, by
-- default identity_sync_evaluator; another role named there needs these grants too), which
-- also calls the compiled query's expression markers (_at, src/evaluate.rs).
GRANT EXECUTE ON FUNCTION identity_sync.normalize_diacritics(text), identity_sync.slug(text),
                          identity_sync.name_variants(text, text)
   TO identity_sync_reader, identity_sync_evaluator;
GRANT EXECUTE ON FUNCTION identity_sync._at(int) TO identity_sync_evaluator;

COMMENT ON FUNCTION identity_sync.add_person_source(regclass, text, text, integer) IS 'Register a person source: one row per person, identified by key (primary key or unique column); several sources have names and priorities (the highest that has a person gives person).';
COMMENT ON FUNCTION identity_sync.add_contract_source(regclass, text, text, text, text) IS 'Register the contract source of a person source (by its name, default ''default''): time-ranged rows (starts, inclusive ends; NULL = open) of a person.';
COMMENT ON FUNCTION identity_sync.add_related_source(regclass, text) IS 'Register a related table; affected is a query over the changed rows ("changed") returning person keys.';
COMMENT ON FUNCTION identity_sync.drop_source(regclass) IS 'Unregister a source and remove its capture triggers.';
COMMENT ON FUNCTION identity_sync.set_primary_contract(text) IS 'ORDER BY over contract (and today) choosing the primary contract; NULL restores the default (active first, latest end, latest start).';
COMMENT ON FUNCTION identity_sync.set_search_path(text) IS 'search_path for user expressions (mappings, rules, affected queries, owners), in checks and in the worker; default public.';
COMMENT ON FUNCTION identity_sync.set_clock(timestamptz) IS 'Evaluate "now" as the given time (NULL = real time): for tests, replays and what-if checks.';
COMMENT ON FUNCTION identity_sync.add_target(text, text, text, jsonb) IS 'Add a target (scim, webhook or table) with validated options.';
COMMENT ON FUNCTION identity_sync.alter_target(text, text, jsonb, text) IS 'Change a target: NULL means unchanged; options are merged, a key set to null is removed.';
COMMENT ON FUNCTION identity_sync.drop_target(text) IS 'Drop a target with its mappings, rules, registry and events.';
COMMENT ON FUNCTION identity_sync.set_secret(text, text) IS 'Set a target''s token, password, client secret or signing key; never readable back.';
COMMENT ON FUNCTION identity_sync.map(text, text, text, boolean, boolean) IS 'Map attribute <- SQL expression; validated now, with the position of any error inside the expression.';
COMMENT ON FUNCTION identity_sync.unmap(text, text) IS 'Remove an attribute mapping.';
COMMENT ON FUNCTION identity_sync.add_rule(text, text, text, text[]) IS 'Add a business rule: a boolean SQL condition and the groups it grants.';
COMMENT ON FUNCTION identity_sync.drop_rule(text, text) IS 'Remove a business rule.';
COMMENT ON FUNCTION identity_sync.normalize_diacritics(text) IS 'Remove diacritics, Unicode-correct: ''Zoë Ångström-Çelik'' -> ''Zoe Angstrom-Celik'' (also ß, ø, ł, dotless i).';
COMMENT ON FUNCTION identity_sync.slug(text) IS 'Login-safe form: diacritics removed, lower case, only a-z 0-9 . - _.';
COMMENT ON FUNCTION identity_sync.name_variants(text, text) IS 'Family-name prefixes (''van der Berg''): prefix, core name, family, display, sort key and login forms.';
