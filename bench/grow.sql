-- bench/grow.sql: copies :first to :last of the employees sample (large: 10,000 persons, emp_no
-- 10001..20000) with new keys (emp_no + k * 10000, so keys stay dense) and shuffled names
-- (first and last names drawn independently from the sample), with their departments and
-- titles. bench/data.sql makes 100,000 persons with copies 1 to 9; bench/run --scale grows the
-- sample to 100,000 and then 1,000,000 (copies 10 to 99) between its measurements.
INSERT INTO employee (emp_no, birth_date, first_name, last_name, gender, hire_date)
SELECT e.emp_no + k * 10000, e.birth_date,
       f.a[1 + ((e.emp_no::bigint * 7919 + k::bigint * 104729) % cardinality(f.a))],
       l.a[1 + ((e.emp_no::bigint * 15485863 + k::bigint * 32452843) % cardinality(l.a))],
       e.gender, e.hire_date
  FROM employee e, generate_series(:first, :last) AS k,
       (SELECT array_agg(DISTINCT first_name) AS a FROM employee) AS f,
       (SELECT array_agg(DISTINCT last_name) AS a FROM employee) AS l
 WHERE e.emp_no <= 20000;
INSERT INTO dept_emp SELECT d.emp_no + k * 10000, d.dept_no, d.from_date, d.to_date
  FROM dept_emp d, generate_series(:first, :last) AS k WHERE d.emp_no <= 20000;
INSERT INTO title SELECT t.emp_no + k * 10000, t.title, t.from_date, t.to_date
  FROM title t, generate_series(:first, :last) AS k WHERE t.emp_no <= 20000;
