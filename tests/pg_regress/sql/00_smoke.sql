-- Smoke test: the extension installs, lives in its own schema, documents itself, and drops
-- cleanly. The NOTICE about the worker's database depends on the cluster, so it is hidden.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
RESET client_min_messages;

SELECT e.extname, n.nspname AS schema, e.extrelocatable,
       e.extversion = (SELECT default_version FROM pg_available_extensions
                       WHERE name = 'identity_sync') AS default_version_installed
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'identity_sync';

SELECT obj_description(e.oid, 'pg_extension') <> '' AS has_description
FROM pg_extension e WHERE e.extname = 'identity_sync';

-- the settings of design.md exist (their values depend on the cluster)
SELECT name FROM pg_settings WHERE name LIKE 'identity\_sync.%' ORDER BY name;

-- every public function of the schema carries a COMMENT (house style: \df+ reads like a manual)
SELECT p.oid::regprocedure AS undocumented_function
FROM pg_proc p
WHERE p.pronamespace = 'identity_sync'::regnamespace
  AND p.proname NOT LIKE '\_%'
  AND obj_description(p.oid, 'pg_proc') IS NULL
ORDER BY 1;

DROP EXTENSION identity_sync;
-- CREATE EXTENSION made the schema that identity_sync.control names; PostgreSQL keeps such a
-- schema after DROP EXTENSION, empty.
SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = 'identity_sync'::regnamespace)
     + (SELECT count(*) FROM pg_proc WHERE pronamespace = 'identity_sync'::regnamespace) AS leftover_objects;
DROP SCHEMA identity_sync;
