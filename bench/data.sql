-- bench/data.sql: the employees sample (large: 10,000 persons, emp_no 10001..20000) multiplied
-- to 100,000 persons: nine copies with new keys (emp_no + k * 10000, so keys stay dense:
-- 10001..110000) and shuffled names (first and last names drawn independently from the
-- sample), with their departments and titles. Salaries are not copied (nothing maps them).
-- Then the tables the capture benchmark compares: employee_plain (identical, no trigger) and
-- employee_rowlog (identical, with the row-level PL/pgSQL trigger writing row_to_json into a
-- log table, the design of Hasura event triggers and Supabase webhooks).
\set ON_ERROR_STOP 1
SET client_min_messages = warning;


INSERT INTO employee (emp_no, birth_date, first_name, last_name, gender, hire_date)
SELECT e.emp_no + k * 10000, e.birth_date,
       f.a[1 + ((e.emp_no::bigint * 7919 + k * 104729) % cardinality(f.a))],
       l.a[1 + ((e.emp_no::bigint * 15485863 + k * 32452843) % cardinality(l.a))],
       e.gender, e.hire_date
  FROM employee e, generate_series(1, 9) AS k,
       (SELECT array_agg(DISTINCT first_name) AS a FROM employee) AS f,
       (SELECT array_agg(DISTINCT last_name) AS a FROM employee) AS l
 WHERE e.emp_no <= 20000;
INSERT INTO dept_emp SELECT d.emp_no + k * 10000, d.dept_no, d.from_date, d.to_date
  FROM dept_emp d, generate_series(1, 9) AS k WHERE d.emp_no <= 20000;
INSERT INTO title SELECT t.emp_no + k * 10000, t.title, t.from_date, t.to_date
  FROM title t, generate_series(1, 9) AS k WHERE t.emp_no <= 20000;

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
