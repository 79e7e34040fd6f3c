-- bench/soak.sql: the HR change stream of `bench/run --soak` (plain SQL in the bench database;
-- not part of the extension). pgbench calls soak_change(random) at a fixed rate; each call is
-- one HR transaction of a realistic kind, on the employees sample's own tables.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE SEQUENCE IF NOT EXISTS soak_hire START 2000001;
-- What the stream did (an insert per change: no row that concurrent changes contend for).
CREATE UNLOGGED TABLE IF NOT EXISTS soak_log (kind text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());

-- One HR change chosen by `r` (uniform random): 5 % hires (a person with a contract in a
-- department from today), 20 % moves (the current contract ends yesterday, a new one in another
-- department starts today), 5 % terminations (the current contract ends yesterday), 70 %
-- renames (a family name changes, as at a marriage). The person is one of those working today,
-- picked by `r` among the persons of the sample and the hires so far.
CREATE OR REPLACE FUNCTION soak_change(r bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    pick int := r % 100;
    k int;
    d char(4);
    last_hire bigint := (SELECT last_value FROM soak_hire);
BEGIN
    IF pick < 5 THEN
        k := nextval('soak_hire');
        INSERT INTO employee (emp_no, birth_date, first_name, last_name, gender, hire_date)
        SELECT k, DATE '1990-01-01' + (r % 7000)::int, e.first_name, e.last_name, e.gender, current_date
          FROM employee e WHERE e.emp_no = 10001 + (r / 100) % 90000;
        INSERT INTO dept_emp (emp_no, dept_no, from_date, to_date)
        VALUES (k, 'd00' || (1 + r % 9), current_date, DATE '9999-01-01');
        INSERT INTO soak_log (kind) VALUES ('hire');
        RETURN 'hire';
    END IF;
    -- someone working today: a person of the sample (10001..109999 after bench/data.sql) or a hire
    k := CASE WHEN last_hire > 2000001 AND r % 10 = 0 THEN 2000001 + (r / 10) % (last_hire - 2000000)
              ELSE 10001 + (r / 100) % 99999 END;
    SELECT de.dept_no INTO d FROM dept_emp de
     WHERE de.emp_no = k AND de.from_date <= current_date AND de.to_date > current_date
     ORDER BY de.from_date DESC LIMIT 1;
    IF d IS NULL THEN
        INSERT INTO soak_log (kind) VALUES ('nothing to do');
        RETURN 'nothing to do';
    END IF;
    IF pick < 25 THEN
        UPDATE dept_emp SET to_date = current_date - 1
         WHERE emp_no = k AND dept_no = d AND to_date > current_date;
        INSERT INTO dept_emp (emp_no, dept_no, from_date, to_date)
        VALUES (k, 'd00' || (1 + (substr(d, 4)::int + r % 8) % 9), current_date, DATE '9999-01-01')
        ON CONFLICT (emp_no, dept_no) DO UPDATE SET from_date = current_date, to_date = DATE '9999-01-01';
        INSERT INTO soak_log (kind) VALUES ('move');
        RETURN 'move';
    ELSIF pick < 30 THEN
        UPDATE dept_emp SET to_date = current_date - 1 WHERE emp_no = k AND to_date > current_date;
        INSERT INTO soak_log (kind) VALUES ('termination');
        RETURN 'termination';
    END IF;
    UPDATE employee SET last_name = (SELECT e.last_name FROM employee e WHERE e.emp_no = 10001 + r % 99999)
     WHERE emp_no = k;
    INSERT INTO soak_log (kind) VALUES ('rename');
    RETURN 'rename';
END
$$;
