-- Privileges: PUBLIC gets only self-service (40_selfservice), readers read status, operators
-- operate, admins configure;
-- secrets can be set but never read back.
SET client_min_messages = error;  -- the warning about the worker depends on the cluster
CREATE EXTENSION identity_sync;
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_nobody;
DROP ROLE IF EXISTS regress_reader;
DROP ROLE IF EXISTS regress_admin;
CREATE ROLE regress_nobody;
CREATE ROLE regress_reader IN ROLE identity_sync_reader;
CREATE ROLE regress_admin IN ROLE identity_sync_admin;
RESET client_min_messages;

SELECT rolname FROM pg_roles WHERE rolname LIKE 'identity\_sync\_%' ORDER BY 1;

SET ROLE regress_nobody;
SELECT * FROM identity_sync.status;
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/');
RESET ROLE;

SET ROLE regress_reader;
SELECT count(*) FROM identity_sync.status;
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/');
SELECT identity_sync.pause('x');
RESET ROLE;

SET ROLE regress_admin;
SET client_min_messages = warning;
SELECT identity_sync.add_target('x', 'webhook', 'http://127.0.0.1:9/');
RESET client_min_messages;
SELECT identity_sync.set_secret('x', 'whsec_c2VjcmV0IHNpZ25pbmcga2V5');
SELECT * FROM identity_sync._secret;
SELECT count(*) FROM identity_sync.audit_log WHERE new::text LIKE '%c2VjcmV0%';
DELETE FROM identity_sync._audit;
RESET ROLE;

SET client_min_messages = warning;
DROP EXTENSION identity_sync CASCADE;
DROP ROLE regress_nobody, regress_reader, regress_admin;
