-- The large JSON values (a group's DINOv2 embeddings, jobs' outputs and payloads) are compressed
-- with lz4 instead of PostgreSQL's default pglz, which took a large share of the database's CPU
-- when scores arrived at a high rate. Only values written from now on are affected; older ones
-- are read as they were stored.
ALTER TABLE groups ALTER COLUMN embeddings SET COMPRESSION lz4;
ALTER TABLE jobs ALTER COLUMN output SET COMPRESSION lz4;
ALTER TABLE jobs ALTER COLUMN payload SET COMPRESSION lz4;
