-- The catalog of the extension, one line per fact, sorted: what tests/upgrade.rs compares
-- between a database updated from the previous release and one where the new release was
-- created afresh. (pg_dump leaves out what belongs to an extension, so it cannot serve.)
-- Object identity is by name, never by oid; columns in their order (attnum without dropped
-- columns: a column added by an update comes last, and so must it in the fresh definition).
WITH ext AS (
    SELECT e.oid, e.extconfig, e.extcondition FROM pg_extension e WHERE e.extname = 'identity_sync'
), ns AS (
    SELECT 'identity_sync'::regnamespace AS oid
), members AS (
    SELECT d.classid, d.objid, d.objsubid FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
), rel AS (
    SELECT c.* FROM pg_class c, ns WHERE c.relnamespace = ns.oid
), facts(line) AS (
    -- what belongs to the extension
    SELECT 'member ' || pg_describe_object(m.classid, m.objid, m.objsubid) FROM members m
    UNION ALL
    -- configuration tables (pg_dump dumps their rows)
    SELECT 'config ' || x.rel::regclass::text || ' where ' || coalesce(x.cond, '')
      FROM ext, unnest(ext.extconfig, ext.extcondition) AS x(rel, cond)
    UNION ALL
    -- relations, their options and privileges
    SELECT format('relation %s kind %s persistence %s options %s rls %s/%s acl %s comment %s',
                  c.oid::regclass, c.relkind, c.relpersistence, c.reloptions, c.relrowsecurity,
                  c.relforcerowsecurity, c.relacl, obj_description(c.oid, 'pg_class'))
      FROM rel c
    UNION ALL
    -- columns, in order
    SELECT format('column %s %s %s %s notnull %s default %s identity %s generated %s storage %s collation %s acl %s comment %s',
                  a.attrelid::regclass,
                  row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum), a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated, a.attstorage,
                  a.attcollation::regcollation, a.attacl, col_description(a.attrelid, a.attnum))
      FROM pg_attribute a JOIN rel c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
     WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind <> 'i'
    UNION ALL
    SELECT format('constraint %s %s %s', c.oid::regclass, k.conname, pg_get_constraintdef(k.oid))
      FROM pg_constraint k JOIN rel c ON c.oid = k.conrelid
    UNION ALL
    SELECT format('index %s', pg_get_indexdef(i.indexrelid)) FROM pg_index i JOIN rel c ON c.oid = i.indrelid
    UNION ALL
    SELECT format('trigger %s enabled %s', pg_get_triggerdef(t.oid), t.tgenabled)
      FROM pg_trigger t JOIN rel c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal
    UNION ALL
    SELECT format('policy %s %s cmd %s permissive %s roles %s using %s check %s', p.polrelid::regclass,
                  p.polname, p.polcmd, p.polpermissive,
                  (SELECT array_agg(r::regrole::text ORDER BY r::regrole::text) FROM unnest(p.polroles) r),
                  pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
      FROM pg_policy p JOIN rel c ON c.oid = p.polrelid
    UNION ALL
    SELECT format('view %s %s', c.oid::regclass, pg_get_viewdef(c.oid)) FROM rel c WHERE c.relkind IN ('v', 'm')
    UNION ALL
    SELECT format('sequence %s %s %s %s %s %s %s', s.seqrelid::regclass, s.seqtypid::regtype, s.seqstart,
                  s.seqincrement, s.seqmax, s.seqmin, s.seqcycle)
      FROM pg_sequence s JOIN rel c ON c.oid = s.seqrelid
    UNION ALL
    -- functions: the whole definition, owner-independent privileges and comment
    SELECT format('function %s acl %s comment %s %s', p.oid::regprocedure, p.proacl,
                  obj_description(p.oid, 'pg_proc'),
                  CASE WHEN p.prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(p.oid)
                       ELSE format('aggregate %s', p.prokind) END)
      FROM pg_proc p, ns WHERE p.pronamespace = ns.oid
    UNION ALL
    -- types (composite types' attributes are among the columns above)
    SELECT format('type %s type %s acl %s comment %s', t.oid::regtype, t.typtype, t.typacl,
                  obj_description(t.oid, 'pg_type'))
      FROM pg_type t, ns WHERE t.typnamespace = ns.oid
    UNION ALL
    SELECT format('enum %s %s %s', e.enumtypid::regtype, e.enumsortorder, e.enumlabel)
      FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid, ns WHERE t.typnamespace = ns.oid
    UNION ALL
    SELECT format('event trigger %s on %s calls %s tags %s enabled %s comment %s', e.evtname, e.evtevent,
                  e.evtfoid::regprocedure, e.evttags, e.evtenabled, obj_description(e.oid, 'pg_event_trigger'))
      FROM pg_event_trigger e
    UNION ALL
    SELECT format('schema %s acl %s comment %s', n.nspname, n.nspacl, obj_description(n.oid, 'pg_namespace'))
      FROM pg_namespace n, ns WHERE n.oid = ns.oid
    UNION ALL
    -- the extension's roles, and who is a member of whom among them
    SELECT format('role %s login %s inherit %s', r.rolname, r.rolcanlogin, r.rolinherit)
      FROM pg_roles r WHERE r.rolname LIKE 'identity\_sync\_%'
    UNION ALL
    SELECT format('membership %s in %s', m.member::regrole, m.roleid::regrole)
      FROM pg_auth_members m
     WHERE m.roleid::regrole::text LIKE 'identity\_sync\_%' OR m.member::regrole::text LIKE 'identity\_sync\_%'
)
SELECT line FROM facts ORDER BY line COLLATE "C";
