-- bench/plan-targets.sql: two dry-run targets with realistic configurations (15 mapped
-- attributes and 5 rules each) for the planner benchmark. dry_run: planned, recorded and
-- applied to the registry as if delivered, so only planning is measured.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

-- A SCIM directory (Entra/Okta-like).
SELECT identity_sync.add_target('directory', 'scim', 'http://127.0.0.1:9/scim/v2', '{"dry_run": true}');
SELECT identity_sync.map('directory', 'userName',
    $$identity_sync.slug(person.first_name || '.' || person.last_name) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$, true, true);
SELECT identity_sync.map('directory', 'externalId', $$person.emp_no::text$$);
SELECT identity_sync.map('directory', 'name.givenName', $$person.first_name$$);
SELECT identity_sync.map('directory', 'name.familyName', $$person.last_name$$);
SELECT identity_sync.map('directory', 'displayName', $$person.first_name || ' ' || person.last_name$$);
SELECT identity_sync.map('directory', 'emails[type eq "work"].value',
    $$identity_sync.slug(person.first_name) || '.' || identity_sync.slug(person.last_name) || '@example.com'$$);
SELECT identity_sync.map('directory', 'title',
    $$(SELECT t.title FROM title t WHERE t.emp_no = person.emp_no ORDER BY t.from_date DESC LIMIT 1)$$);
SELECT identity_sync.map('directory', 'userType', $$CASE WHEN contract.to_date = '9999-01-01' THEN 'Employee' ELSE 'Former employee' END$$);
SELECT identity_sync.map('directory', 'preferredLanguage', $$text 'en-US'$$);
SELECT identity_sync.map('directory', 'timezone', $$text 'Europe/Amsterdam'$$);
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber', $$person.emp_no::text$$);
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department',
    $$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)$$);
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter', $$'CC-' || contract.dept_no$$);
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:organization', $$text 'Example Corp'$$);
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value',
    $$identity_sync.person_ref((SELECT dm.emp_no FROM dept_manager dm WHERE dm.dept_no = contract.dept_no AND dm.to_date = '9999-01-01' AND dm.emp_no <> person.emp_no ORDER BY dm.from_date DESC LIMIT 1))$$);
SELECT identity_sync.add_rule('directory', 'employees', $$true$$, '{all-staff}');
SELECT identity_sync.add_rule('directory', 'sales', $$contract.dept_no = 'd007'$$, '{sales}');
SELECT identity_sync.add_rule('directory', 'development', $$contract.dept_no = 'd005'$$, '{development}');
SELECT identity_sync.add_rule('directory', 'engineers',
    $$EXISTS (SELECT FROM title t WHERE t.emp_no = person.emp_no AND t.title LIKE '%Engineer%' AND t.to_date = '9999-01-01')$$, '{engineering}');
SELECT identity_sync.add_rule('directory', 'managers',
    $$EXISTS (SELECT FROM dept_manager dm WHERE dm.emp_no = person.emp_no AND dm.to_date = '9999-01-01')$$, '{managers}');

-- An HR event feed (webhook) with flat attributes.
SELECT identity_sync.add_target('feed', 'webhook', 'http://127.0.0.1:9/hook', '{"dry_run": true}');
SELECT identity_sync.map('feed', 'employee_id', $$person.emp_no$$);
SELECT identity_sync.map('feed', 'first_name', $$person.first_name$$);
SELECT identity_sync.map('feed', 'last_name', $$person.last_name$$);
SELECT identity_sync.map('feed', 'full_name', $$person.first_name || ' ' || person.last_name$$);
SELECT identity_sync.map('feed', 'email', $$lower(identity_sync.slug(person.first_name) || '.' || identity_sync.slug(person.last_name)) || '@example.com'$$);
SELECT identity_sync.map('feed', 'gender', $$person.gender$$);
SELECT identity_sync.map('feed', 'birth_date', $$person.birth_date$$);
SELECT identity_sync.map('feed', 'hire_date', $$person.hire_date$$);
SELECT identity_sync.map('feed', 'department_code', $$contract.dept_no$$);
SELECT identity_sync.map('feed', 'department', $$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)$$);
SELECT identity_sync.map('feed', 'contract_start', $$contract.from_date$$);
SELECT identity_sync.map('feed', 'contract_end', $$nullif(contract.to_date, '9999-01-01')$$);
SELECT identity_sync.map('feed', 'contracts', $$cardinality(contracts)$$);
SELECT identity_sync.map('feed', 'title',
    $$(SELECT t.title FROM title t WHERE t.emp_no = person.emp_no ORDER BY t.from_date DESC LIMIT 1)$$);
SELECT identity_sync.map('feed', 'seniority_years', $$extract(year FROM age(today, person.hire_date))::int$$);
SELECT identity_sync.add_rule('feed', 'current', $$contract.to_date = '9999-01-01'$$, '{}');
SELECT identity_sync.add_rule('feed', 'leavers', $$contract.to_date < today AND contract.to_date > today - 365$$, '{leavers}');
SELECT identity_sync.add_rule('feed', 'customer-service', $$contract.dept_no = 'd009'$$, '{customer-service}');
SELECT identity_sync.add_rule('feed', 'research', $$contract.dept_no = 'd008'$$, '{research}');
SELECT identity_sync.add_rule('feed', 'veterans', $$person.hire_date < date '1987-01-01'$$, '{veterans}');
