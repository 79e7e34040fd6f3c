-- A small contractor register, as a vendor-management system keeps it: one row per contractor
-- with the agency, the department they work for and the assignment's dates (end NULL = open).
-- national_id is what HR also records for a contractor hired as an employee (README, "Several
-- sources"). Fabricated data; any similarity to real people is coincidental.
DROP TABLE IF EXISTS contractor;
CREATE TABLE contractor (
    contractor_id text PRIMARY KEY,
    national_id   text UNIQUE,
    first_name    text NOT NULL,
    last_name     text NOT NULL,
    birth_date    date,
    email         text,
    company       text NOT NULL,
    dept_no       char(4),
    start_date    date NOT NULL,
    end_date      date
);
INSERT INTO contractor VALUES
('C-1001', 'NL-184732051', 'Ingrid',   'Vos',        '1984-03-12', 'ingrid.vos@brightsource.example',    'BrightSource Staffing', 'd005', '2024-01-08', NULL),
('C-1002', 'NL-209913874', 'Mehmet',   'Kaya',       '1979-11-02', 'm.kaya@kaya-it.example',            'Kaya IT Consultancy',   'd005', '2023-09-01', '2026-12-31'),
('C-1003', 'NL-173300452', 'Sofie',    'de Jong',    '1991-06-25', 'sofie.dejong@brightsource.example', 'BrightSource Staffing', 'd007', '2025-02-03', NULL),
('C-1004', 'BE-850612337', 'Lucas',    'Peeters',    '1985-06-12', 'lucas@peeters-design.example',      'Peeters Design BVBA',   'd001', '2024-05-15', NULL),
('C-1005', 'DE-330918741', 'Anna',     'Schmidt',    '1990-09-18', 'anna.schmidt@interim.example',      'Interim Partners GmbH', 'd009', '2025-06-01', '2027-05-31'),
('C-1006', 'NL-220187735', 'Noah',     'Bakker',     '1998-01-30', NULL,                                'Campus Talent',         'd008', '2026-02-01', '2026-07-31'),
('C-1007', 'NL-195562018', 'Fatima',   'El Amrani',  '1988-12-09', 'f.elamrani@brightsource.example',   'BrightSource Staffing', 'd002', '2022-10-10', NULL),
('C-1008', 'FR-760224481', 'Camille',  'Laurent',    '1982-04-22', 'camille.laurent@secureops.example', 'SecureOps SARL',        'd004', '2025-11-17', NULL),
('C-1009', 'NL-241106659', 'Daan',     'Visser',     '2001-08-14', NULL,                                'Campus Talent',         'd006', '2026-09-01', '2027-01-31'),
('C-1010', 'PL-880305772', 'Katarzyna','Nowak',      '1988-03-05', 'k.nowak@interim.example',           'Interim Partners GmbH', 'd005', '2024-03-04', NULL);
