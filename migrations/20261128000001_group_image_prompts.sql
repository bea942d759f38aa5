-- What each image of a group was generated from: its prompt with the background caption and the
-- object description it was composed of (dataset records carry them per image). Groups planned
-- before this column existed have NULL.
ALTER TABLE groups ADD COLUMN image_prompts JSONB;
