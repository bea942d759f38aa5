//! The WebDataset form: tar shards in which the files of a sample share its key, the group id
//! without dashes (WebDataset groups members by the part of their name before the first dot).
//! Each sample is its images and masks in sample order, then its record:
//! `{key}.0.png`, `{key}.0.mask.png`, `{key}.1.png`, ..., `{key}.json`.

use super::Sample;
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::io::{Read, Write};
use syncd_proto::dataset::DatasetRecord;

/// Writes samples into one tar shard.
pub struct TarShardWriter<W: Write> {
    builder: tar::Builder<W>,
}

impl<W: Write> TarShardWriter<W> {
    pub fn new(writer: W) -> Self {
        Self {
            builder: tar::Builder::new(writer),
        }
    }

    /// Appends the sample's members under the names its record gives them.
    pub fn append(&mut self, sample: &Sample) -> Result<()> {
        let record = &sample.record;
        ensure!(
            sample.images.len() == record.images.len() && sample.masks.len() == record.masks.len(),
            "sample {} has {} images and {} masks for {} names",
            record.key,
            sample.images.len(),
            sample.masks.len(),
            record.images.len()
        );
        let members = record.images.iter().zip(&sample.images);
        let masks = record.masks.iter().zip(&sample.masks);
        for ((image_name, image), (mask_name, mask)) in members.zip(masks) {
            self.member(image_name, image)?;
            self.member(mask_name, mask)?;
        }
        self.member(
            &format!("{}.json", record.key),
            &serde_json::to_vec_pretty(record)?,
        )
    }

    fn member(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        // No time stamps: assembling again makes the same bytes.
        header.set_mtime(0);
        header.set_cksum();
        self.builder.append_data(&mut header, name, bytes)?;
        Ok(())
    }

    /// Ends the archive and returns the writer (to flush it).
    pub fn finish(self) -> Result<W> {
        Ok(self.builder.into_inner()?)
    }
}

/// Reads the samples of one tar shard in order, calling `each` with every sample once its
/// record has been read; returns how many there were. A member the record does not name, or a
/// name without its member, is an error: a reader must not skip part of the dataset silently.
pub fn read_samples(reader: impl Read, mut each: impl FnMut(Sample) -> Result<()>) -> Result<u64> {
    let mut archive = tar::Archive::new(reader);
    // Members of the sample being read, by name, until its record arrives (it comes last).
    let mut pending: HashMap<String, Bytes> = HashMap::new();
    let mut samples = 0;
    for entry in archive.entries().context("reading the shard")? {
        let mut entry = entry.context("reading the shard")?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut content = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut content)
            .with_context(|| format!("reading member {name}"))?;
        let Some(key) = name.strip_suffix(".json") else {
            pending.insert(name, content.into());
            continue;
        };
        let record: DatasetRecord = serde_json::from_slice(&content)
            .with_context(|| format!("reading the record {name}"))?;
        ensure!(
            record.key == key,
            "the record {name} is of sample {}",
            record.key
        );
        let mut take = |names: &[String]| -> Result<Vec<Bytes>> {
            names
                .iter()
                .map(|member| {
                    pending
                        .remove(member)
                        .with_context(|| format!("the shard lacks {member}, named by {name}"))
                })
                .collect()
        };
        let images = take(&record.images)?;
        let masks = take(&record.masks)?;
        if let Some(stray) = pending.keys().next() {
            bail!("member {stray} is named by no record");
        }
        each(Sample {
            record,
            images,
            masks,
        })?;
        samples += 1;
    }
    if let Some(stray) = pending.keys().next() {
        bail!("member {stray} is named by no record");
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::tests::sample;

    fn shard(samples: &[Sample]) -> Vec<u8> {
        let mut writer = TarShardWriter::new(Vec::new());
        for sample in samples {
            writer.append(sample).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn samples_are_read_back_as_written() {
        let written = [sample(1, 3), sample(2, 2)];
        let mut read = Vec::new();
        let count = read_samples(shard(&written).as_slice(), |sample| {
            read.push(sample);
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 2);
        for (read, written) in read.iter().zip(&written) {
            assert_eq!(read.record, written.record);
            assert_eq!(read.images, written.images);
            assert_eq!(read.masks, written.masks);
        }
    }

    #[test]
    fn the_members_are_in_the_documented_order() {
        let written = sample(1, 2);
        let key = &written.record.key;
        let bytes = shard(std::slice::from_ref(&written));
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                entry
                    .unwrap()
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let expected: Vec<String> = ["0.png", "0.mask.png", "1.png", "1.mask.png", "json"]
            .iter()
            .map(|suffix| format!("{key}.{suffix}"))
            .collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn a_member_no_record_names_is_an_error() {
        let mut writer = TarShardWriter::new(Vec::new());
        writer.member("stray.png", b"not a sample").unwrap();
        let bytes = writer.finish().unwrap();
        let error = read_samples(bytes.as_slice(), |_| Ok(())).unwrap_err();
        assert!(error.to_string().contains("stray.png"), "{error}");
    }
}
