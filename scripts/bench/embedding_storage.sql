-- How a group's DINOv2 embeddings (3 x 1024 floats) cost to store, as JSONB (lz4, as groups kept
-- them before migration group_embeddings_as_reals) and as the `real[]` matrix groups keep now
-- (STORAGE EXTERNAL), side by side in one run: the time of one UPDATE writing 5,000 groups'
-- embeddings each way, sent as the coordinator sends them (JSON text of the widened floats; one
-- flat float array made into rows by array_agg), and the bytes each table takes a group.
--
-- Usage, on a scratch database (it makes and drops its own tables):
--   createdb embedding_bench && psql -d embedding_bench -f scripts/bench/embedding_storage.sql
\set ON_ERROR_STOP on
\timing off
DROP TABLE IF EXISTS groups_json, groups_real;
CREATE TABLE groups_json (id int PRIMARY KEY, embeddings jsonb);
ALTER TABLE groups_json ALTER COLUMN embeddings SET COMPRESSION lz4;
CREATE TABLE groups_real (id int PRIMARY KEY, embeddings real[]);
ALTER TABLE groups_real ALTER COLUMN embeddings SET STORAGE EXTERNAL;
INSERT INTO groups_json SELECT i, NULL FROM generate_series(1, 5000) i;
INSERT INTO groups_real SELECT i, NULL FROM generate_series(1, 5000) i;
CREATE TEMP TABLE flat AS
SELECT i, ARRAY(SELECT (random() - 0.5)::real FROM generate_series(1, 3072) WHERE i > 0) AS vals
FROM generate_series(1, 5000) i;
CREATE TEMP TABLE as_json AS
SELECT i, (SELECT jsonb_agg(image ORDER BY row)
           FROM (SELECT (k - 1) / 1024 AS row, jsonb_agg(to_jsonb(vals[k]::float8) ORDER BY k) AS image
                 FROM generate_series(1, 3072) k GROUP BY (k - 1) / 1024) images)::text AS text
FROM flat;
CHECKPOINT;
\echo 'JSONB:'
\timing on
UPDATE groups_json g SET embeddings = j.text::jsonb FROM as_json j WHERE g.id = j.i;
\timing off
\echo 'real[] rows:'
\timing on
UPDATE groups_real g
SET embeddings = (SELECT array_agg(f.vals[(image - 1) * 1024 + 1 : image * 1024] ORDER BY image)
                  FROM generate_series(1, 3) image)
FROM flat f WHERE g.id = f.i;
\timing off
SELECT 'JSONB' AS stored_as, pg_total_relation_size('groups_json') / 5000 AS bytes_a_group
UNION ALL
SELECT 'real[] rows', pg_total_relation_size('groups_real') / 5000;
DROP TABLE groups_json, groups_real;
