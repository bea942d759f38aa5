-- Each decided group's contact sheet (its images with their masks outlined, prompts, scores and
-- the decision), written to S3 beside the group's images by the coordinator's sheets loop.
-- `sheet_at` NULL means the group has no sheet of its current decision yet: the loop renders
-- one. A sheet that cannot be made (an image missing from S3, undecodable) keeps its error and
-- is tried again only at `sheet_retry_at`, later after each failure, never in a hot loop.
ALTER TABLE groups
    ADD COLUMN sheet_key      TEXT,
    ADD COLUMN sheet_at       TIMESTAMPTZ,
    ADD COLUMN sheet_error    TEXT,
    ADD COLUMN sheet_failures INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN sheet_retry_at TIMESTAMPTZ;
-- The loop's scan: decided groups without a sheet, oldest decision first.
CREATE INDEX groups_sheet_due ON groups (decided_at) WHERE sheet_at IS NULL AND decision <> 'pending';
