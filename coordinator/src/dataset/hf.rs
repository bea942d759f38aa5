//! The Hugging Face form of the dataset: one Parquet file per tar shard (the same samples in the
//! same order) and a dataset card. `datasets` refuses the WebDataset shards, whose samples hold
//! 2 or 3 images and so differ in members; here every sample is one row of fixed columns, and an
//! image a group lacks is a null, not a missing member.
//!
//! Columns, for a run generating N images per group (3 by default), `i` in `0..N`:
//!
//! - `key` (the WebDataset key), `run_id`, `group_id`, `object_id`;
//! - `object_type` (`deformable` or `rigid`), then `category` and `description` of a deformable
//!   object, `uid` and `caption` of a rigid one (null for the other kind);
//! - `num_images`: how many images the sample has (2 to N), the rest of the `_i` columns null;
//! - `image_i`, `mask_i`: images as `datasets` stores them, `{bytes, path}` structs holding the
//!   PNG bytes and their tar member name;
//! - `prompt_i`, `aesthetic_i`;
//! - `dino_scores`: the `num_images` x `num_images` matrix of DINOv2 similarities in sample
//!   order, 1.0 on the diagonal (the SynCD trainer's form);
//! - `seed`, and `record`: the whole [`DatasetRecord`] as JSON, as the tar shard's `.json`.
//!
//! `datasets` takes column types from the Arrow schema stored in the file, and how to decode
//! them (images as images) from the schema's `huggingface` metadata, as in files it writes.
//!
//! [`row`] turns one sample into a row and knows nothing of where its bytes came from, so rows
//! can be made wherever the images are.

use super::{DatasetIndex, Sample};
use anyhow::{ensure, Context, Result};
use arrow_array::builder::{Float32Builder, ListBuilder};
use arrow_array::{
    ArrayRef, BinaryArray, Float32Array, Int32Array, RecordBatch, StringArray, StructArray,
    UInt64Array,
};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use syncd_proto::messages::ObjectSpec;

/// Buffered rows are written out as a row group once they take this much: it bounds the memory
/// assembly needs whatever the shard size, and readers stream a file a row group at a time.
const ROW_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// A Hugging Face image: what the `Image` feature stores.
pub struct ImageValue<'a> {
    pub bytes: &'a [u8],
    /// Where the bytes are in the WebDataset form, for a reader to trace an image back.
    pub path: &'a str,
}

/// One value of a row; its variant is its column's type.
pub enum Cell<'a> {
    Text(Option<String>),
    Int32(i32),
    UInt64(u64),
    Float32(Option<f32>),
    Image(Option<ImageValue<'a>>),
    /// A matrix of float32 as a list of rows, a missing entry null.
    Matrix(Vec<Vec<Option<f32>>>),
}

impl Cell<'_> {
    fn data_type(&self) -> DataType {
        match self {
            Cell::Text(_) => DataType::Utf8,
            Cell::Int32(_) => DataType::Int32,
            Cell::UInt64(_) => DataType::UInt64,
            Cell::Float32(_) => DataType::Float32,
            Cell::Image(_) => DataType::Struct(image_fields()),
            Cell::Matrix(_) => list_of(list_of(DataType::Float32)),
        }
    }

    /// The `datasets` feature of the column, as `Features.to_dict()` writes it.
    fn feature(&self) -> Value {
        let value = |dtype: &str| json!({"dtype": dtype, "_type": "Value"});
        match self {
            Cell::Text(_) => value("string"),
            Cell::Int32(_) => value("int32"),
            Cell::UInt64(_) => value("uint64"),
            Cell::Float32(_) => value("float32"),
            Cell::Image(_) => json!({"_type": "Image"}),
            // `Sequence` rather than `List`: `datasets` before 4.0 knows only the former, and
            // later versions read it as a `List`.
            Cell::Matrix(_) => json!({
                "feature": {"feature": value("float32"), "_type": "Sequence"},
                "_type": "Sequence",
            }),
        }
    }

    /// The value as a column of one row.
    fn array(&self) -> ArrayRef {
        match self {
            Cell::Text(text) => Arc::new(StringArray::from(vec![text.as_deref()])),
            Cell::Int32(number) => Arc::new(Int32Array::from(vec![*number])),
            Cell::UInt64(number) => Arc::new(UInt64Array::from(vec![*number])),
            Cell::Float32(number) => Arc::new(Float32Array::from(vec![*number])),
            Cell::Image(image) => {
                let bytes = BinaryArray::from(vec![image.as_ref().map(|image| image.bytes)]);
                let path = StringArray::from(vec![image.as_ref().map(|image| image.path)]);
                Arc::new(StructArray::new(
                    image_fields(),
                    vec![Arc::new(bytes), Arc::new(path)],
                    Some(NullBuffer::from(vec![image.is_some()])),
                ))
            }
            Cell::Matrix(rows) => {
                let mut builder = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
                for row in rows {
                    for &value in row {
                        builder.values().values().append_option(value);
                    }
                    builder.values().append(true);
                }
                builder.append(true);
                Arc::new(builder.finish())
            }
        }
    }
}

/// The fields of `datasets`' `Image` storage type, `struct<bytes: binary, path: string>`.
fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// A list type with Arrow's default item name, the one `pyarrow.list_` gives: `datasets`
/// applies a column's feature only if the stored type equals the feature's exactly.
fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

/// The row of one sample, column by column in schema order. `columns` is the number of images
/// a group has in the run (the `_i` columns); the sample may have fewer.
pub fn row(sample: &Sample, columns: usize) -> Result<Vec<(String, Cell<'_>)>> {
    let record = &sample.record;
    let images = record.images.len();
    ensure!(
        images <= columns,
        "sample {} has {images} images, more than the run's {columns}",
        record.key
    );
    ensure!(
        sample.images.len() == images && sample.masks.len() == images,
        "sample {} has {} images and {} masks for {images} names",
        record.key,
        sample.images.len(),
        sample.masks.len()
    );
    let text = |value: &str| Cell::Text(Some(value.to_string()));
    let (object_type, category, description, uid, caption) = match &record.object {
        ObjectSpec::Deformable {
            category,
            description,
        } => ("deformable", Some(category), Some(description), None, None),
        ObjectSpec::Rigid { uid, caption, .. } => ("rigid", None, None, Some(uid), Some(caption)),
    };
    let mut row: Vec<(String, Cell)> = vec![
        ("key".into(), text(&record.key)),
        ("run_id".into(), text(&record.run_id.to_string())),
        ("group_id".into(), text(&record.group_id.to_string())),
        ("object_id".into(), text(&record.object_id.to_string())),
        ("object_type".into(), text(object_type)),
        ("category".into(), Cell::Text(category.cloned())),
        ("description".into(), Cell::Text(description.cloned())),
        ("uid".into(), Cell::Text(uid.cloned())),
        ("caption".into(), Cell::Text(caption.cloned())),
        ("num_images".into(), Cell::Int32(images as i32)),
    ];
    for i in 0..columns {
        let value = image_value(&sample.images, &record.images, i);
        row.push((format!("image_{i}"), Cell::Image(value)));
    }
    for i in 0..columns {
        let value = image_value(&sample.masks, &record.masks, i);
        row.push((format!("mask_{i}"), Cell::Image(value)));
    }
    for i in 0..columns {
        let prompt = record.prompts.get(i).filter(|_| i < images).cloned();
        row.push((format!("prompt_{i}"), Cell::Text(prompt)));
    }
    for i in 0..columns {
        // The record writes a score it lacks as NaN; a column says null.
        let score = record
            .aesthetic
            .get(i)
            .copied()
            .filter(|score| !score.is_nan());
        row.push((format!("aesthetic_{i}"), Cell::Float32(score)));
    }
    row.push((
        "dino_scores".into(),
        Cell::Matrix(record.similarity_matrix()),
    ));
    row.push(("seed".into(), Cell::UInt64(record.seed)));
    let json = serde_json::to_string(record).context("encoding the record")?;
    row.push(("record".into(), Cell::Text(Some(json))));
    Ok(row)
}

/// Image `i` of a sample, if it has one: its bytes and its member name.
fn image_value<'a>(bytes: &'a [Bytes], names: &'a [String], i: usize) -> Option<ImageValue<'a>> {
    let (bytes, path) = bytes.get(i).zip(names.get(i))?;
    Some(ImageValue {
        bytes: bytes.as_ref(),
        path: path.as_str(),
    })
}

/// The schema of rows like `row`, with the `datasets` features in its metadata.
fn schema(row: &[(String, Cell)]) -> Schema {
    // Every column nullable: `datasets` features are, and a column whose stored field differs
    // from its feature's (nullability included) is not decoded by the feature.
    let fields: Vec<Field> = row
        .iter()
        .map(|(name, cell)| Field::new(name, cell.data_type(), true))
        .collect();
    let features: Map<String, Value> = row
        .iter()
        .map(|(name, cell)| (name.clone(), cell.feature()))
        .collect();
    let metadata = json!({"info": {"features": features}});
    Schema::new_with_metadata(
        fields,
        HashMap::from([("huggingface".to_string(), metadata.to_string())]),
    )
}

/// Writes samples into one Parquet file. The schema is taken from the first row.
pub struct ParquetShardWriter {
    columns: usize,
    /// The file, until the first row gives the schema to open the writer with.
    file: Option<File>,
    writer: Option<(ArrowWriter<File>, SchemaRef)>,
}

impl ParquetShardWriter {
    /// A writer into `file` for a run of `columns` images per group.
    pub fn new(file: File, columns: usize) -> Self {
        Self {
            columns,
            file: Some(file),
            writer: None,
        }
    }

    pub fn append(&mut self, sample: &Sample) -> Result<()> {
        let row = row(sample, self.columns)?;
        if self.writer.is_none() {
            let schema = Arc::new(schema(&row));
            let file = self.file.take().context("the Parquet file is closed")?;
            let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties(&schema)))
                .context("starting a Parquet file")?;
            self.writer = Some((writer, schema));
        }
        let Some((writer, schema)) = self.writer.as_mut() else {
            unreachable!("opened above");
        };
        let arrays = row.iter().map(|(_, cell)| cell.array()).collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays)
            .with_context(|| format!("the row of sample {}", sample.record.key))?;
        writer.write(&batch).context("writing a Parquet row")?;
        if writer.in_progress_size() >= ROW_GROUP_BYTES {
            writer.flush().context("writing a Parquet row group")?;
        }
        Ok(())
    }

    /// Writes the last row group and the footer.
    pub fn finish(self) -> Result<()> {
        if let Some((writer, _)) = self.writer {
            writer.close().context("closing the Parquet file")?;
        }
        Ok(())
    }
}

fn properties(schema: &Schema) -> WriterProperties {
    // Uncompressed: the bulk is PNG bytes, compressed already. No dictionaries: image bytes never
    // repeat. No statistics for image bytes: their minimum and maximum would be image-sized.
    let mut builder = WriterProperties::builder().set_dictionary_enabled(false);
    for field in schema.fields() {
        if matches!(field.data_type(), DataType::Struct(_)) {
            let bytes = ColumnPath::new(vec![field.name().clone(), "bytes".into()]);
            builder = builder.set_column_statistics_enabled(bytes, EnabledStatistics::None);
        }
    }
    builder.build()
}

/// The dataset card (`README.md`) of the dataset folder: its YAML header's `configs` name the
/// Parquet files, so `datasets.load_dataset(folder)` reads them and leaves the tar shards, and
/// the other files beside them, alone. The files are listed, not globbed: the card names only
/// the shards already written, while more are being packed beside them.
pub fn card(index: &DatasetIndex) -> String {
    let files: String = index
        .parquet_shards
        .iter()
        .map(|shard| {
            let name = shard.key.rsplit('/').next().unwrap_or(&shard.key);
            format!("\n    - {name}")
        })
        .collect();
    let files = if files.is_empty() {
        " []".into()
    } else {
        files
    };
    format!(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path:{files}\n---\n\n\
         # {name}\n\n\
         A multi-image synthetic dataset made by syncd (run `{name}`, {run_id}): {samples} samples, \
         each a group of consistent images of one object, {images} images in all.\n\n\
         The same samples are in two forms here: the WebDataset tar shards (`shard-*.tar`, listed \
         in `index.json`) and the Parquet files above, one per tar shard. Each Parquet row is one \
         sample with fixed columns: `image_i`, `mask_i`, `prompt_i` and `aesthetic_i` for each \
         image `i` (null past `num_images`), `dino_scores` (the images' DINOv2 similarities), the \
         object (`object_type`, `category`, `description`, `uid`, `caption`), `seed`, and \
         `record`, the sample's whole record as JSON.\n",
        name = index.run_name,
        run_id = index.run_id,
        samples = index.samples,
        images = index.images,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::tests::sample;
    use crate::dataset::ShardEntry;
    use arrow_array::{Array, ListArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn written(samples: &[Sample]) -> Vec<RecordBatch> {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut writer = ParquetShardWriter::new(file.reopen().unwrap(), 3);
        for sample in samples {
            writer.append(sample).unwrap();
        }
        writer.finish().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file.reopen().unwrap()).unwrap();
        let metadata = reader.schema().metadata().get("huggingface").cloned();
        let features: Value = serde_json::from_str(&metadata.expect("features")).unwrap();
        assert_eq!(features["info"]["features"]["image_2"]["_type"], "Image");
        assert_eq!(features["info"]["features"]["mask_0"]["_type"], "Image");
        assert_eq!(features["info"]["features"]["seed"]["dtype"], "uint64");
        reader.build().unwrap().map(Result::unwrap).collect()
    }

    fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
        batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .as_any()
            .downcast_ref::<T>()
            .unwrap_or_else(|| panic!("column {name} of another type"))
    }

    #[test]
    fn a_missing_image_is_null_in_fixed_columns() {
        let samples = [sample(1, 3), sample(2, 2)];
        let batches = written(&samples);
        assert_eq!(batches.len(), 1, "two rows make one batch");
        let batch = &batches[0];
        assert_eq!(batch.num_rows(), 2);
        let image_2 = column::<StructArray>(batch, "image_2");
        assert!(image_2.is_valid(0) && image_2.is_null(1));
        let image_1 = column::<StructArray>(batch, "image_1");
        let bytes = image_1
            .column(0)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .unwrap();
        assert_eq!(bytes.value(1), samples[1].images[1].as_ref());
        let paths = image_1
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(paths.value(1), samples[1].record.images[1]);
        let prompts = column::<StringArray>(batch, "prompt_2");
        assert_eq!((prompts.value(0), prompts.is_null(1)), ("prompt 2", true));
        let aesthetic = column::<Float32Array>(batch, "aesthetic_2");
        assert!(aesthetic.is_null(1));
        let counts = column::<Int32Array>(batch, "num_images");
        assert_eq!((counts.value(0), counts.value(1)), (3, 2));
        let dino = column::<ListArray>(batch, "dino_scores");
        assert_eq!(dino.value(1).len(), 2, "a 2 x 2 matrix for two images");
        let record = column::<StringArray>(batch, "record");
        let record: syncd_proto::dataset::DatasetRecord =
            serde_json::from_str(record.value(1)).unwrap();
        assert_eq!(record, samples[1].record);
    }

    #[test]
    fn the_card_lists_the_parquet_files() {
        let mut index = DatasetIndex {
            run_id: syncd_proto::RunId(uuid::Uuid::from_u128(1)),
            run_name: "demo".into(),
            samples: 3,
            images: 8,
            shards: Vec::new(),
            parquet_shards: Vec::new(),
            card: None,
            complete: true,
        };
        for shard in 0..2 {
            index.parquet_shards.push(ShardEntry {
                key: syncd_proto::keys::dataset_parquet_shard("demo", shard),
                samples: 2,
            });
        }
        let card = card(&index);
        assert!(
            card.starts_with(
                "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path:\n    \
                 - shard-000000.parquet\n    - shard-000001.parquet\n---\n"
            ),
            "{card}"
        );
        index.parquet_shards.clear();
        assert!(super::card(&index).contains("    path: []\n---\n"));
    }
}
