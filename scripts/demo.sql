-- The demo's configuration (run by scripts/demo in database hr, with ON_ERROR_STOP and the psql
-- variables scim_url, scim_token, hook_url, hook_secret): the HR sources, a SCIM directory and
-- a signed webhook feed with realistic mappings and rules, then the initial sync.
\set QUIET on
SET client_min_messages = warning;

\echo '    sources: employee (person), dept_emp (contracts), department (lookup)'
-- identity_sync evaluates mappings, rules and the affected query as identity_sync_evaluator
-- (README, Security), which reads what it is granted.
GRANT SELECT ON employee, dept_emp, department, dept_manager, title TO identity_sync_evaluator;
SELECT identity_sync.add_person_source('employee', 'emp_no') \g /dev/null
SELECT identity_sync.add_contract_source('dept_emp', 'emp_no', 'from_date', 'to_date') \g /dev/null
SELECT identity_sync.add_related_source('department',
    'SELECT de.emp_no FROM dept_emp de JOIN changed c USING (dept_no)') \g /dev/null

-- A SCIM 2.0 directory (think Entra ID or Okta): current Finance and Marketing staff, with a
-- group per department.
\echo '    target directory (SCIM 2.0): current Finance and Marketing staff, a group per department'
SELECT identity_sync.add_target('directory', 'scim', :'scim_url',
    '{"auth": "bearer", "correlate_on": "externalId", "create_groups": true}') \g /dev/null
SELECT identity_sync.set_secret('directory', :'scim_token') \g /dev/null
SELECT identity_sync.map('directory', 'userName',
    $$identity_sync.slug(person.first_name || '.' || person.last_name) || CASE WHEN iteration > 0 THEN (iteration + 1)::text ELSE '' END$$,
    true, true) \g /dev/null
SELECT identity_sync.map('directory', 'externalId', $$person.emp_no::text$$) \g /dev/null
SELECT identity_sync.map('directory', 'name.givenName', $$person.first_name$$) \g /dev/null
SELECT identity_sync.map('directory', 'name.familyName', $$person.last_name$$) \g /dev/null
SELECT identity_sync.map('directory', 'displayName', $$person.first_name || ' ' || person.last_name$$) \g /dev/null
SELECT identity_sync.map('directory', 'emails[type eq "work"].value',
    $$identity_sync.slug(person.first_name) || '.' || identity_sync.slug(person.last_name) || '@example.com'$$) \g /dev/null
SELECT identity_sync.map('directory', 'title',
    $$(SELECT t.title FROM title t WHERE t.emp_no = person.emp_no ORDER BY t.from_date DESC LIMIT 1)$$) \g /dev/null
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber',
    $$person.emp_no::text$$) \g /dev/null
SELECT identity_sync.map('directory', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department',
    $$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)$$) \g /dev/null
SELECT identity_sync.add_rule('directory', 'finance',
    $$contract.dept_no = 'd002' AND contract.to_date >= today$$, '{Finance}') \g /dev/null
SELECT identity_sync.add_rule('directory', 'marketing',
    $$contract.dept_no = 'd001' AND contract.to_date >= today$$, '{Marketing}') \g /dev/null

-- A payroll feed (signed webhooks, Standard Webhooks): current Finance, Marketing and Human
-- Resources staff; a leaver's account is disabled (a `disable` event).
\echo '    target payroll (signed webhook): current Finance, Marketing and HR staff'
SELECT identity_sync.add_target('payroll', 'webhook', :'hook_url') \g /dev/null
SELECT identity_sync.set_secret('payroll', :'hook_secret') \g /dev/null
SELECT identity_sync.map('payroll', 'employee_id', $$person.emp_no$$) \g /dev/null
SELECT identity_sync.map('payroll', 'full_name', $$person.first_name || ' ' || person.last_name$$) \g /dev/null
SELECT identity_sync.map('payroll', 'email',
    $$identity_sync.slug(person.first_name) || '.' || identity_sync.slug(person.last_name) || '@example.com'$$) \g /dev/null
SELECT identity_sync.map('payroll', 'department',
    $$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)$$) \g /dev/null
SELECT identity_sync.map('payroll', 'start_date', $$contract.from_date$$) \g /dev/null
SELECT identity_sync.map('payroll', 'end_date', $$nullif(contract.to_date, '9999-01-01')$$) \g /dev/null
SELECT identity_sync.add_rule('payroll', 'finance, marketing and hr',
    $$contract.dept_no IN ('d001', 'd002', 'd003') AND contract.to_date >= today$$) \g /dev/null

-- The initial sync: every person is planned for both targets, in the worker's batches.
SELECT identity_sync.resync('directory') + identity_sync.resync('payroll') AS persons \gset
\echo '    initial sync started:' :persons 'person plans (2 targets)'
