-- The near-duplicate index (coordinator/src/near_duplicates.rs). Every image of every accepted
-- group is a row of near_duplicate_images with its DINOv2 embedding, and its locality-sensitive
-- signature is 40 rows of near_duplicate_buckets (one bucket key per band, salted by the run, so
-- runs never share a bucket). A check looks up the groups sharing a bucket with the candidate
-- through the buckets' primary key and applies the exact rule to them: its cost follows the
-- number of similar groups, not the size of the run, and a restart loads nothing.
CREATE TABLE near_duplicate_images (
    group_id  UUID NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    image     SMALLINT NOT NULL,
    run_id    UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    embedding REAL[] NOT NULL,
    PRIMARY KEY (group_id, image)
);

-- No foreign key: a lookup reaches images only through near_duplicate_images, so the buckets of a
-- deleted group match nothing, and deleting a group need not search this table.
CREATE TABLE near_duplicate_buckets (
    bucket   BIGINT NOT NULL,
    group_id UUID NOT NULL,
    PRIMARY KEY (bucket, group_id)
);

-- Runs with groups accepted before the index existed: their accepted groups are indexed (from
-- groups.embeddings) by the first check that meets the run, and the row is then deleted.
CREATE TABLE near_duplicate_backfills (
    run_id UUID PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE
);
INSERT INTO near_duplicate_backfills (run_id)
SELECT DISTINCT run_id FROM groups WHERE decision = 'accepted';
