//! Contact sheets: what a person looks at to judge a group. Pure functions from pictures (a
//! group's images with their masks) and the group's record to PNG bytes; fetching them from S3
//! and storing the result is [`crate::pictures`]'s part.
//!
//! A sheet shows, top to bottom: a band in the colour of the decision with the run, object and
//! group ids; the object; the images side by side, each fitted into a [`TILE`]-pixel square with
//! its mask's edge drawn over it in [`OUTLINE`]; under each image its aesthetic score, whether it
//! is valid and its prompt (wrapped); the DINOv2 similarity of each pair against the run's range;
//! the decision and its reason. A grid ([`render_grid`]) puts many groups' thumbnails on one
//! picture, each labelled with its decision.
//!
//! Text is drawn with `embedded-graphics`' built-in bitmap fonts (ISO 8859-1: other characters
//! show as `?`), so rendering needs no font file and gives the same bytes on every machine.

use crate::groups::GroupRecord;
use anyhow::{Context, Result};
use embedded_graphics::mono_font::iso_8859_1::{FONT_10X20, FONT_7X13, FONT_7X13_BOLD};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::text::{Baseline, Text};
use image::imageops::{self, FilterType};
use image::{GrayImage, Rgb, RgbImage};
use syncd_proto::messages::ObjectSpec;

/// Side of the square each image of a sheet is fitted into.
pub const TILE: u32 = 384;
/// Side of the square each image of a grid cell is fitted into.
pub const THUMB: u32 = 128;
/// The colour of the masks' outlines: a magenta that photographs seldom contain.
pub const OUTLINE: [u8; 3] = [255, 0, 255];
/// The outline's width, drawn inside the mask's edge so that it never covers background.
const OUTLINE_WIDTH: i64 = 2;
const MARGIN: u32 = 16;
const GAP: u32 = 16;
/// Space between a grid cell's thumbnails.
const THUMB_GAP: u32 = 4;
/// Columns of a grid at most.
const GRID_COLUMNS: usize = 4;
/// Lines of a prompt under its image at most; a longer prompt ends in "...".
const PROMPT_LINES: usize = 8;
/// Lines of the reason in a grid cell at most.
const CELL_REASON_LINES: usize = 2;
/// Space between two lines of text.
const LINE_GAP: u32 = 3;

const PAPER: [u8; 3] = [250, 250, 247];
const TILE_PAPER: [u8; 3] = [222, 222, 222];
const INK: [u8; 3] = [33, 33, 33];
const MUTED: [u8; 3] = [105, 105, 105];
const WHITE: [u8; 3] = [255, 255, 255];
const GOOD: [u8; 3] = [46, 125, 50];
const BAD: [u8; 3] = [198, 40, 40];

/// The colour a decision is shown in.
pub fn decision_colour(decision: &str) -> [u8; 3] {
    match decision {
        "accepted" => GOOD,
        "rejected" => BAD,
        "near_duplicate" => [230, 106, 0],
        "failed" => [97, 97, 97],
        _ => [21, 101, 192],
    }
}

/// One image of a group and its foreground mask, decoded.
pub struct Picture {
    pub image: RgbImage,
    pub mask: Option<GrayImage>,
}

impl Picture {
    /// Decodes an image and its mask (PNG, or any format the `image` crate reads here).
    pub fn decode(image: &[u8], mask: Option<&[u8]>) -> Result<Self> {
        let image = image::load_from_memory(image)
            .context("decoding an image")?
            .to_rgb8();
        let mask = mask
            .map(|mask| {
                image::load_from_memory(mask)
                    .context("decoding a mask")
                    .map(|mask| mask.to_luma8())
            })
            .transpose()?;
        Ok(Self { image, mask })
    }

    /// The image fitted into a `side`-pixel square, keeping its aspect, with its mask outlined.
    /// Smaller images are enlarged with the nearest pixel, so that they show as they are.
    fn tile(&self, side: u32) -> RgbImage {
        let (width, height) = self.image.dimensions();
        let scale = (f64::from(side) / f64::from(width.max(1)))
            .min(f64::from(side) / f64::from(height.max(1)));
        let fitted = |length: u32| ((f64::from(length) * scale).round() as u32).clamp(1, side);
        let (tile_width, tile_height) = (fitted(width), fitted(height));
        let filter = if tile_width >= width {
            FilterType::Nearest
        } else {
            FilterType::Triangle
        };
        let mut tile = imageops::resize(&self.image, tile_width, tile_height, filter);
        if let Some(mask) = &self.mask {
            let mask = imageops::resize(mask, tile_width, tile_height, FilterType::Nearest);
            outline(&mut tile, &mask);
        }
        tile
    }
}

/// Paints [`OUTLINE`] over the foreground pixels of `mask` (same size as `tile`) that lie within
/// [`OUTLINE_WIDTH`] pixels of the background or of the picture's border.
fn outline(tile: &mut RgbImage, mask: &GrayImage) {
    let (width, height) = mask.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && x < i64::from(width)
            && y < i64::from(height)
            && mask.get_pixel(x as u32, y as u32)[0] >= 128
    };
    let reach = -OUTLINE_WIDTH..=OUTLINE_WIDTH;
    for y in 0..i64::from(height) {
        for x in 0..i64::from(width) {
            let on_edge = inside(x, y)
                && reach
                    .clone()
                    .any(|dy| reach.clone().any(|dx| !inside(x + dx, y + dy)));
            if on_edge {
                tile.put_pixel(x as u32, y as u32, Rgb(OUTLINE));
            }
        }
    }
}

/// One line of text in a font and a colour.
struct Line {
    text: String,
    font: &'static MonoFont<'static>,
    colour: [u8; 3],
}

impl Line {
    fn new(text: impl Into<String>, font: &'static MonoFont<'static>, colour: [u8; 3]) -> Self {
        Self {
            text: text.into(),
            font,
            colour,
        }
    }

    fn height(&self) -> u32 {
        self.font.character_size.height + LINE_GAP
    }
}

fn height(lines: &[Line]) -> u32 {
    lines.iter().map(Line::height).sum()
}

/// `text` in lines of `font` at most `width` pixels wide, in at most `max_lines` lines (the last
/// one ending in "..." when the text was longer).
fn wrap(
    text: &str,
    width: u32,
    font: &'static MonoFont<'static>,
    colour: [u8; 3],
    max_lines: usize,
) -> Vec<Line> {
    let advance = font.character_size.width + font.character_spacing;
    let columns = (width / advance.max(1)).max(4) as usize;
    // Control characters (a newline in a prompt) would move the pen; they read as spaces.
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut lines: Vec<String> = textwrap::wrap(&flat, columns)
        .into_iter()
        .map(|line| line.into_owned())
        .collect();
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            let kept: String = last.chars().take(columns.saturating_sub(3)).collect();
            *last = format!("{kept}...");
        }
    }
    lines
        .into_iter()
        .map(|line| Line::new(line, font, colour))
        .collect()
}

/// An RGB picture that `embedded-graphics` draws text on.
struct Canvas(RgbImage);

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Self(RgbImage::from_pixel(width, height, Rgb(PAPER)))
    }

    fn fill(&mut self, x: u32, y: u32, width: u32, height: u32, colour: [u8; 3]) {
        for row in y..(y + height).min(self.0.height()) {
            for column in x..(x + width).min(self.0.width()) {
                self.0.put_pixel(column, row, Rgb(colour));
            }
        }
    }

    /// Draws `picture` fitted into a `side` square at (`x`, `y`), centred on a grey ground.
    fn tile(&mut self, picture: &Picture, x: u32, y: u32, side: u32) {
        self.fill(x, y, side, side, TILE_PAPER);
        let tile = picture.tile(side);
        let left = x + (side - tile.width()) / 2;
        let top = y + (side - tile.height()) / 2;
        imageops::replace(&mut self.0, &tile, i64::from(left), i64::from(top));
    }

    /// Draws `lines` from (`x`, `y`) down; returns the height they took.
    fn lines(&mut self, x: u32, y: u32, lines: &[Line]) -> u32 {
        let mut top = y;
        for line in lines {
            let [r, g, b] = line.colour;
            let style = MonoTextStyle::new(line.font, Rgb888::new(r, g, b));
            let position = Point::new(x as i32, top as i32);
            // Drawing on this canvas cannot fail (its error type is Infallible).
            let _ = Text::with_baseline(&line.text, position, style, Baseline::Top).draw(self);
            top += line.height();
        }
        top - y
    }

    fn png(self) -> Result<Vec<u8>> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        self.0
            .write_to(&mut bytes, image::ImageFormat::Png)
            .context("encoding a PNG")?;
        Ok(bytes.into_inner())
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let (width, height) = self.0.dimensions();
        for Pixel(point, colour) in pixels {
            if let (Ok(x), Ok(y)) = (u32::try_from(point.x), u32::try_from(point.y)) {
                if x < width && y < height {
                    self.0
                        .put_pixel(x, y, Rgb([colour.r(), colour.g(), colour.b()]));
                }
            }
        }
        Ok(())
    }
}

/// The object in words.
fn object_text(object: &ObjectSpec) -> String {
    match object {
        ObjectSpec::Deformable {
            category,
            description,
        } => format!("object: {category} - {description}"),
        ObjectSpec::Rigid { uid, caption, .. } => format!("object: asset {uid} - {caption}"),
    }
}

/// The width of a sheet of `images` images.
pub fn sheet_width(images: usize) -> u32 {
    let images = images.max(1) as u32;
    2 * MARGIN + images * TILE + (images - 1) * GAP
}

/// The words under image `index`: its score, whether it is valid, its prompt.
fn image_caption(record: &GroupRecord, index: usize) -> Vec<Line> {
    let score = record.aesthetic_text(index);
    let (validity, colour) = match record.image_valid(index) {
        Some(true) => ("valid", GOOD),
        Some(false) => ("not valid", BAD),
        None => ("", MUTED),
    };
    let mut lines = vec![
        Line::new(format!("image {index}   {score}"), &FONT_7X13_BOLD, INK),
        Line::new(validity, &FONT_7X13_BOLD, colour),
    ];
    let prompt = record.prompts.get(index).map_or("", String::as_str);
    lines.extend(wrap(prompt, TILE, &FONT_7X13, INK, PROMPT_LINES));
    lines
}

/// The pair similarities against the run's range, and the filter's other thresholds.
fn scores_text(record: &GroupRecord, width: u32) -> Vec<Line> {
    let thresholds = &record.thresholds;
    let mut lines = wrap(
        &format!(
            "DINOv2 pair similarities (counting within [{:.2}, {:.2}]; images need aesthetic >= \
             {:.2}; groups need {} valid images)",
            thresholds.min_similarity,
            thresholds.max_similarity,
            thresholds.min_aesthetic,
            thresholds.min_valid_images
        ),
        width,
        &FONT_7X13_BOLD,
        INK,
        usize::MAX,
    );
    match record.pairs.as_deref() {
        None | Some([]) => lines.push(Line::new("  not scored", &FONT_7X13, MUTED)),
        Some(pairs) => {
            for pair in pairs {
                let within = (thresholds.min_similarity..=thresholds.max_similarity)
                    .contains(&pair.similarity);
                let (verdict, colour) = if within {
                    ("within the range", GOOD)
                } else {
                    ("outside the range", BAD)
                };
                lines.push(Line::new(
                    format!(
                        "  images {} and {}: {:.4}  {verdict}",
                        pair.a, pair.b, pair.similarity
                    ),
                    &FONT_7X13,
                    colour,
                ));
            }
        }
    }
    lines
}

/// Renders the contact sheet of `record` with its `pictures` (in group order) as PNG bytes.
pub fn render_sheet(record: &GroupRecord, pictures: &[Picture]) -> Result<Vec<u8>> {
    let width = sheet_width(pictures.len());
    let text_width = width - 2 * MARGIN;
    let colour = decision_colour(&record.decision);
    let title = vec![Line::new(
        format!(
            "{}   group {}",
            record.decision.to_uppercase().replace('_', " "),
            record.id
        ),
        &FONT_10X20,
        WHITE,
    )];
    let ids = wrap(
        &format!(
            "run {} ({})   object {} ({})   group index {}   seed {}",
            record.run_name,
            record.run_id,
            record.object_ordinal,
            record.object_id,
            record.index,
            record.seed
        ),
        text_width,
        &FONT_7X13,
        WHITE,
        usize::MAX,
    );
    let object = wrap(
        &object_text(&record.object),
        text_width,
        &FONT_7X13,
        INK,
        usize::MAX,
    );
    let captions: Vec<Vec<Line>> = (0..pictures.len())
        .map(|index| image_caption(record, index))
        .collect();
    let scores = scores_text(record, text_width);
    let mut decision = vec![Line::new(
        format!("decision: {}", record.decision.replace('_', " ")),
        &FONT_7X13_BOLD,
        colour,
    )];
    decision.extend(wrap(
        record.reason.as_deref().unwrap_or("no reason recorded"),
        text_width,
        &FONT_7X13,
        INK,
        usize::MAX,
    ));

    let band = MARGIN / 2 + height(&title) + height(&ids) + MARGIN / 2;
    let captions_height = captions.iter().map(|lines| height(lines)).max();
    let total = band
        + MARGIN
        + height(&object)
        + GAP / 2
        + TILE
        + GAP / 2
        + captions_height.unwrap_or(0)
        + GAP
        + height(&scores)
        + GAP
        + height(&decision)
        + MARGIN;

    let mut canvas = Canvas::new(width, total);
    canvas.fill(0, 0, width, band, colour);
    let mut y = MARGIN / 2;
    y += canvas.lines(MARGIN, y, &title);
    canvas.lines(MARGIN, y, &ids);
    y = band + MARGIN;
    y += canvas.lines(MARGIN, y, &object) + GAP / 2;
    for (index, (picture, caption)) in pictures.iter().zip(&captions).enumerate() {
        let x = MARGIN + index as u32 * (TILE + GAP);
        canvas.tile(picture, x, y, TILE);
        canvas.lines(x, y + TILE + GAP / 2, caption);
    }
    y += TILE + GAP / 2 + captions_height.unwrap_or(0) + GAP;
    y += canvas.lines(MARGIN, y, &scores) + GAP;
    canvas.lines(MARGIN, y, &decision);
    canvas.png()
}

/// Renders a grid of groups, each as its pictures' thumbnails labelled with its decision, object,
/// group and scores, under `title`, as PNG bytes.
pub fn render_grid(title: &str, cells: &[(GroupRecord, Vec<Picture>)]) -> Result<Vec<u8>> {
    let images = cells
        .iter()
        .map(|(_, pictures)| pictures.len())
        .max()
        .unwrap_or(0)
        .max(1) as u32;
    let cell_width = images * THUMB + (images - 1) * THUMB_GAP;
    let columns = cells.len().clamp(1, GRID_COLUMNS) as u32;
    let rows = cells.len().div_ceil(GRID_COLUMNS).max(1) as u32;
    let width = 2 * MARGIN + columns * cell_width + (columns - 1) * GAP;
    let title = wrap(title, width - 2 * MARGIN, &FONT_10X20, INK, usize::MAX);
    let labels: Vec<Vec<Line>> = cells
        .iter()
        .map(|(record, _)| cell_label(record, cell_width))
        .collect();
    // Every cell gets the room of the tallest label, so that rows line up.
    let label_height = labels.iter().map(|lines| height(lines)).max().unwrap_or(0);
    let cell_height = THUMB + GAP / 2 + label_height;
    let total = MARGIN + height(&title) + GAP + rows * (cell_height + GAP) - GAP + MARGIN;

    let mut canvas = Canvas::new(width, total);
    let top = MARGIN + canvas.lines(MARGIN, MARGIN, &title) + GAP;
    for (number, ((_, pictures), label)) in cells.iter().zip(&labels).enumerate() {
        let (column, row) = (
            number as u32 % GRID_COLUMNS as u32,
            number as u32 / GRID_COLUMNS as u32,
        );
        let x = MARGIN + column * (cell_width + GAP);
        let y = top + row * (cell_height + GAP);
        for (index, picture) in pictures.iter().enumerate() {
            canvas.tile(picture, x + index as u32 * (THUMB + THUMB_GAP), y, THUMB);
        }
        canvas.lines(x, y + THUMB + GAP / 2, label);
    }
    canvas.png()
}

/// A grid cell's label: decision and position, the group id, the scores, the reason.
fn cell_label(record: &GroupRecord, width: u32) -> Vec<Line> {
    let scores = record.aesthetic.as_ref().map_or_else(
        || "not scored".to_string(),
        |scores| {
            let scores: Vec<String> = scores.iter().map(|score| format!("{score:.2}")).collect();
            format!("aesthetic {}", scores.join(" / "))
        },
    );
    let mut lines = vec![
        Line::new(
            format!(
                "{}  object {} group {}",
                record.decision.replace('_', " "),
                record.object_ordinal,
                record.index
            ),
            &FONT_7X13_BOLD,
            decision_colour(&record.decision),
        ),
        Line::new(record.id.to_string(), &FONT_7X13, MUTED),
        Line::new(scores, &FONT_7X13, INK),
    ];
    lines.extend(wrap(
        record.reason.as_deref().unwrap_or(""),
        width,
        &FONT_7X13,
        INK,
        CELL_REASON_LINES,
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::SheetState;
    use syncd_proto::filter::FilterThresholds;
    use syncd_proto::messages::PairSimilarity;
    use syncd_proto::{GroupId, ObjectId, RunId};
    use uuid::Uuid;

    /// A 64x64 gradient tinted by `tint`, with a centred square mask (16..48), like the test
    /// workers make.
    fn picture(tint: [u8; 3]) -> Picture {
        let image = RgbImage::from_fn(64, 64, |x, y| {
            Rgb([tint[0] + x as u8, tint[1] + y as u8, tint[2]])
        });
        let mask = GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) {
                255
            } else {
                0
            }])
        });
        Picture {
            image,
            mask: Some(mask),
        }
    }

    fn record(decision: &str, prompts: Vec<String>) -> GroupRecord {
        GroupRecord {
            id: GroupId(Uuid::from_u128(3)),
            run_id: RunId(Uuid::from_u128(1)),
            run_name: "cats".into(),
            object_id: ObjectId(Uuid::from_u128(2)),
            object_ordinal: 4,
            object: ObjectSpec::Deformable {
                category: "Cat".into(),
                description: "a grey cat with white paws".into(),
            },
            index: 0,
            seed: 42,
            decision: decision.into(),
            reason: Some("2 of 3 images valid".into()),
            decided_at: None,
            prompts,
            image_prompts: None,
            aesthetic: Some(vec![6.5, 5.25, 7.0]),
            pairs: Some(vec![
                PairSimilarity {
                    a: 0,
                    b: 1,
                    similarity: 0.81,
                },
                PairSimilarity {
                    a: 0,
                    b: 2,
                    similarity: 0.99,
                },
                PairSimilarity {
                    a: 1,
                    b: 2,
                    similarity: 0.5,
                },
            ]),
            valid_images: Some(vec![0, 2]),
            image_keys: None,
            mask_keys: None,
            thresholds: FilterThresholds::default(),
            sheet: SheetState::default(),
            lineage: None,
            trace_id: None,
        }
    }

    fn prompts() -> Vec<String> {
        (0..3)
            .map(|i| format!("a photo of a grey cat with white paws, scene number {i}"))
            .collect()
    }

    fn pictures() -> Vec<Picture> {
        vec![
            picture([10, 20, 200]),
            picture([120, 30, 60]),
            picture([60, 150, 90]),
        ]
    }

    fn decode(png: &[u8]) -> RgbImage {
        image::load_from_memory(png).unwrap().to_rgb8()
    }

    fn count(image: &RgbImage, colour: [u8; 3]) -> usize {
        image.pixels().filter(|pixel| pixel.0 == colour).count()
    }

    #[test]
    fn a_tile_outlines_the_mask_edge_and_keeps_the_pixels() {
        let tile = picture([10, 20, 200]).tile(TILE);
        assert_eq!(tile.dimensions(), (TILE, TILE), "64 px enlarged 6 times");
        // The mask's square spans 96..288 at this scale; its edge is painted 2 px wide.
        for (x, y) in [(96, 150), (97, 150), (287, 150), (150, 96), (150, 287)] {
            assert_eq!(tile.get_pixel(x, y).0, OUTLINE, "edge pixel ({x}, {y})");
        }
        // Inside and outside the mask the image shows as it is, each pixel 6 x 6.
        for (x, y) in [(98, 150), (150, 150), (95, 150), (10, 10), (383, 383)] {
            let original = [10 + (x / 6) as u8, 20 + (y / 6) as u8, 200];
            assert_eq!(tile.get_pixel(x, y).0, original, "pixel ({x}, {y})");
        }
        let outlined = tile.pixels().filter(|pixel| pixel.0 == OUTLINE).count();
        assert_eq!(outlined, 192 * 192 - 188 * 188, "a 2 px ring, nothing else");
    }

    #[test]
    fn a_mask_touching_the_border_is_outlined_along_it_and_sizes_may_differ() {
        let image = RgbImage::from_pixel(100, 50, Rgb([0, 0, 0]));
        // A mask of another size than its image, all foreground.
        let mask = GrayImage::from_pixel(10, 10, image::Luma([255]));
        let tile = Picture {
            image,
            mask: Some(mask),
        }
        .tile(TILE);
        assert_eq!(tile.dimensions(), (TILE, TILE / 2), "the aspect is kept");
        assert_eq!(tile.get_pixel(0, 100).0, OUTLINE);
        assert_eq!(tile.get_pixel(200, 100).0, [0, 0, 0]);
    }

    #[test]
    fn a_sheet_shows_the_images_their_outlines_and_text() {
        let record = record("accepted", prompts());
        let sheet = decode(&render_sheet(&record, &pictures()).unwrap());
        assert_eq!(sheet.width(), sheet_width(3));
        assert_eq!(sheet.width(), 2 * 16 + 3 * 384 + 2 * 16);
        assert!(sheet.height() > TILE + 100);
        assert_eq!(
            count(&sheet, OUTLINE),
            3 * (192 * 192 - 188 * 188),
            "each image's mask outlined"
        );
        // Each image's pixels are there (its unmasked part, 36 sheet pixels each).
        for tint in [[10, 20, 200], [120, 30, 60], [60, 150, 90]] {
            assert_eq!(count(&sheet, [tint[0] + 1, tint[1] + 1, tint[2]]), 36);
        }
        // The header band is in the decision's colour, with white text on it.
        assert_eq!(sheet.get_pixel(2, 2).0, GOOD);
        assert!(count(&sheet, WHITE) > 500, "ids in the header");
        // The captions, scores and reason are written: text of every colour used.
        assert!(count(&sheet, INK) > 2000);
        assert!(count(&sheet, BAD) > 100, "not valid, outside the range");
        // A longer prompt takes more lines, so more ink.
        let long = vec!["a photo of a cat on a wooden table ".repeat(5); 3];
        let longer = decode(&render_sheet(&record_with(long), &pictures()).unwrap());
        assert!(longer.height() > sheet.height());
        assert!(count(&longer, INK) > count(&sheet, INK));
    }

    fn record_with(prompts: Vec<String>) -> GroupRecord {
        record("accepted", prompts)
    }

    #[test]
    fn rendering_is_deterministic_and_shows_the_decision() {
        let accepted = render_sheet(&record("accepted", prompts()), &pictures()).unwrap();
        assert_eq!(
            accepted,
            render_sheet(&record("accepted", prompts()), &pictures()).unwrap()
        );
        let rejected = render_sheet(&record("rejected", prompts()), &pictures()).unwrap();
        assert_ne!(accepted, rejected);
        assert_eq!(decode(&rejected).get_pixel(2, 2).0, BAD);
    }

    #[test]
    fn unscored_groups_odd_text_and_missing_masks_render() {
        let mut record = record("failed", vec!["日本語 🐱 ünïcödé\nline\ttab".into()]);
        record.aesthetic = None;
        record.pairs = None;
        record.valid_images = None;
        record.reason = None;
        let picture = Picture {
            image: RgbImage::from_pixel(1, 1, Rgb([9, 9, 9])),
            mask: None,
        };
        let sheet = decode(&render_sheet(&record, &[picture]).unwrap());
        assert_eq!(sheet.width(), sheet_width(1));
        assert_eq!(count(&sheet, OUTLINE), 0, "no mask, no outline");
        assert_eq!(count(&sheet, [9, 9, 9]), (TILE * TILE) as usize);
        // Nothing at all still makes a sheet (a group whose images were not generated).
        render_sheet(&record, &[]).unwrap();
    }

    #[test]
    fn a_grid_lays_out_labelled_cells_four_to_a_row() {
        let cells: Vec<(GroupRecord, Vec<Picture>)> = ["accepted", "rejected", "accepted"]
            .iter()
            .cycle()
            .take(5)
            .map(|decision| (record(decision, prompts()), pictures()))
            .collect();
        let png = render_grid("cats: 5 groups", &cells).unwrap();
        let grid = decode(&png);
        let cell_width = 3 * THUMB + 2 * THUMB_GAP;
        assert_eq!(grid.width(), 2 * MARGIN + 4 * cell_width + 3 * GAP);
        assert!(grid.height() > 2 * THUMB);
        // 64 px thumbnails of 128: every image pixel shows as 2 x 2.
        assert_eq!(count(&grid, [11, 21, 200]), 5 * 4);
        assert!(count(&grid, OUTLINE) > 0);
        assert!(count(&grid, GOOD) > 0 && count(&grid, BAD) > 0);
        assert_eq!(png, render_grid("cats: 5 groups", &cells).unwrap());
        // One cell makes a grid one cell wide.
        let single = decode(&render_grid("one", &cells[..1]).unwrap());
        assert_eq!(single.width(), 2 * MARGIN + cell_width);
    }

    #[test]
    fn undecodable_bytes_are_an_error() {
        assert!(Picture::decode(b"not a png", None).is_err());
        let mut png = std::io::Cursor::new(Vec::new());
        RgbImage::from_pixel(2, 2, Rgb([1, 2, 3]))
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        let png = png.into_inner();
        assert!(Picture::decode(&png, Some(b"garbage")).is_err());
        let picture = Picture::decode(&png, Some(&png)).unwrap();
        assert_eq!(picture.image.get_pixel(1, 1).0, [1, 2, 3]);
    }
}
