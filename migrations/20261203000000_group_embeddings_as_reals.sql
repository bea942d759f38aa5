-- A group's DINOv2 embeddings are kept as a two-dimensional `real[]`, one row per image (3 x 1024
-- with DINOv2-L), instead of JSON. As JSONB numbers they took about 42 KB a group, which made
-- `groups` the largest table of a long run (16 GB at 400K groups), and writing them took ten times
-- the database's time (scripts/bench/embedding_storage.sql); as floats they take 14 KB. They are
-- stored out of line without compression (STORAGE EXTERNAL): embeddings do not compress, so
-- trying would only cost CPU on every score.
--
-- Stored embeddings are converted as they are. Those that form no matrix (none, an empty
-- embedding, or images of mixed lengths) could never be compared by the near-duplicate rule and
-- are not kept (NULL), as such embeddings are not kept from now on. A JSON null inside an
-- embedding (how a non-finite float was written) becomes NaN.
ALTER TABLE groups ADD COLUMN embedding_rows REAL[];
ALTER TABLE groups ALTER COLUMN embedding_rows SET STORAGE EXTERNAL;

UPDATE groups
SET embedding_rows = (
    SELECT array_agg(
               ARRAY(SELECT coalesce(value::real, 'NaN')
                     FROM jsonb_array_elements_text(image.vector) WITH ORDINALITY AS v (value, position)
                     ORDER BY v.position)
               ORDER BY image.position)
    FROM jsonb_array_elements(embeddings) WITH ORDINALITY AS image (vector, position))
-- CASE, not AND: PostgreSQL may evaluate the conditions of an AND in any order, and the array
-- functions fail on a scalar.
WHERE CASE WHEN jsonb_typeof(embeddings) = 'array' THEN
          (SELECT count(*) > 0
                  AND bool_and(jsonb_typeof(vector) = 'array')
                  AND count(DISTINCT CASE WHEN jsonb_typeof(vector) = 'array'
                                          THEN jsonb_array_length(vector) END) = 1
                  AND min(CASE WHEN jsonb_typeof(vector) = 'array'
                               THEN jsonb_array_length(vector) END) > 0
           FROM jsonb_array_elements(embeddings) AS image (vector))
      ELSE false END;

ALTER TABLE groups DROP COLUMN embeddings;
ALTER TABLE groups RENAME COLUMN embedding_rows TO embeddings;
