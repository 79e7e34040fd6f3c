-- bench/data.sql: the employees sample (large: 10,000 persons, emp_no 10001..20000) multiplied
-- to 100,000 persons: nine copies with new keys (emp_no + k * 10000, so keys stay dense:
-- 10001..110000) and shuffled names (first and last names drawn independently from the
-- sample), with their departments and titles. Salaries are not copied (nothing maps them).
-- Then the tables the capture benchmark compares: employee_plain (identical, no trigger) and
-- employee_rowlog (identical, with the row-level PL/pgSQL trigger writing row_to_json into a
-- log table, the design of Hasura event triggers and Supabase webhooks).
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

\set first 1
\set last 9
\ir grow.sql

-- Capture comparison tables (same columns, key and indexes as employee).
DROP TABLE IF EXISTS employee_plain, employee_rowlog, employee_rowlog_log;
CREATE TABLE employee_plain (LIKE employee INCLUDING ALL);
INSERT INTO employee_plain SELECT * FROM employee;
CREATE TABLE employee_rowlog (LIKE employee INCLUDING ALL);
INSERT INTO employee_rowlog SELECT * FROM employee;
CREATE TABLE employee_rowlog_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    op text NOT NULL,
    row_data json,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION employee_rowlog_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO employee_rowlog_log (op, row_data)
    VALUES (TG_OP, row_to_json(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END));
    RETURN NULL;
END
$$;
CREATE TRIGGER employee_rowlog_capture AFTER INSERT OR UPDATE OR DELETE ON employee_rowlog
    FOR EACH ROW EXECUTE FUNCTION employee_rowlog_capture();

VACUUM ANALYZE employee, dept_emp, title, department, employee_plain, employee_rowlog;
SELECT count(*) AS persons FROM employee;
