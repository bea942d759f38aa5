-- Each indexed image's sketch (coordinator/src/near_duplicates.rs, syncd_proto::dedup::Sketch):
-- the 880 sign bits of its signature, 110 bytes. A check reads the sketches of the groups that
-- share a bucket with the candidate and reads the embeddings (4 KB each) only of the groups whose
-- sketches come close enough to the candidate's, so that groups of one category, which share
-- buckets often, cost 140 bytes an image instead. Images indexed before have no sketch (NULL):
-- computing one needs the signature's hyperplanes, which only the coordinator knows, and such
-- images' groups are always compared, as before.
ALTER TABLE near_duplicate_images ADD COLUMN sketch BYTEA;
