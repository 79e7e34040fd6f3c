-- The last step of the script (pgrx "finalize"), one statement, and the only one that must run
-- last: PostgreSQL lets PUBLIC execute every new function, and pgrx places the functions written
-- in Rust anywhere in the script (only those a file requires come before it). Those nobody
-- granted become private here; see _revoke_public_execute() in 00_schema.sql.
SELECT identity_sync._revoke_public_execute();
