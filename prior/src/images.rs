//! The images the prior hands over: the depth control image FLUX.1-Depth-dev is conditioned on,
//! the foreground mask, and a picture of correspondences for people checking a render.
//!
//! The depth control image follows the reference: inverse depth (disparity) over the foreground,
//! min-max normalised to [0, 1] over the foreground, background 0, written as 8-bit grayscale
//! (near is bright, like the monocular depth estimators FLUX's depth model was trained with).
//! Consumers expand it to RGB. Note that min-max normalisation maps the farthest foreground
//! point to 0 as well, exactly as the reference does.

use crate::error::{PriorError, Result};
use crate::raster::DepthMap;
use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use syncd_proto::correspondence::{ndc_to_pixel, CorrespondenceRow};

/// The depth control image as grayscale values in [0, 1], row-major.
pub fn depth_control(depth: &DepthMap) -> Vec<f32> {
    let foreground = || depth.depth.iter().filter(|&&d| d > 0.0).map(|&d| 1.0 / d);
    let (near, far) = foreground().fold((f32::NEG_INFINITY, f32::INFINITY), |(max, min), v| {
        (max.max(v), min.min(v))
    });
    let span = near - far;
    depth
        .depth
        .iter()
        .map(|&d| {
            if d <= 0.0 {
                0.0
            } else if span > 0.0 {
                (1.0 / d - far) / span
            } else {
                // A constant-depth object has no range to normalise: show it uniformly near.
                1.0
            }
        })
        .collect()
}

/// The depth control image as a PNG (8-bit grayscale).
pub fn depth_control_png(depth: &DepthMap) -> Result<Vec<u8>> {
    let values = depth_control(depth);
    let image = GrayImage::from_fn(depth.width, depth.height, |col, row| {
        let value = values[(row * depth.width + col) as usize];
        Luma([(value * 255.0).round().clamp(0.0, 255.0) as u8])
    });
    encode_png(&image, "depth control image")
}

/// The foreground mask as a PNG (8-bit grayscale, 255 on the object, 0 elsewhere).
pub fn mask_png(depth: &DepthMap) -> Result<Vec<u8>> {
    let image = GrayImage::from_fn(depth.width, depth.height, |col, row| {
        Luma([if depth.is_foreground(i64::from(col), i64::from(row)) {
            255
        } else {
            0
        }])
    });
    encode_png(&image, "mask")
}

/// A picture of the matches from view A to view B: the two grid depth images side by side,
/// enlarged `zoom` times, with a line from each of about `lines` evenly picked matches in A to
/// its point in B.
pub fn correspondence_picture(
    depth_a: &DepthMap,
    depth_b: &DepthMap,
    rows: &[CorrespondenceRow],
    zoom: u32,
    lines: usize,
) -> RgbImage {
    let grid = depth_a.width;
    let side = grid * zoom;
    let mut picture = RgbImage::new(2 * side, side);
    for (panel, depth) in [depth_a, depth_b].into_iter().enumerate() {
        let values = depth_control(depth);
        for row in 0..side {
            for col in 0..side {
                let index = ((row / zoom) * grid + col / zoom) as usize;
                // Foreground from dark grey (far) to white (near), so the far end stays visible.
                let shade = if depth.depth[index] > 0.0 {
                    (60.0 + 195.0 * values[index]) as u8
                } else {
                    0
                };
                picture.put_pixel(panel as u32 * side + col, row, Rgb([shade, shade, shade]));
            }
        }
    }
    let step = (rows.len() / lines.max(1)).max(1);
    for (index, row) in rows.iter().step_by(step).enumerate() {
        let [y1, x1, y2, x2] = *row;
        let Some((row_a, col_a)) = ndc_to_pixel(grid, y1, x1) else {
            continue;
        };
        let start = (
            (col_a as f32 + 0.5) * zoom as f32,
            (row_a as f32 + 0.5) * zoom as f32,
        );
        // (y2, x2) is a continuous position: undo the NDC mapping instead of snapping it.
        let end = (
            side as f32 + (0.5 - 0.5 * x2) * side as f32,
            (0.5 - 0.5 * y2) * side as f32,
        );
        draw_line(&mut picture, start, end, palette(index));
    }
    picture
}

pub fn encode_png<P, C>(image: &image::ImageBuffer<P, C>, what: &str) -> Result<Vec<u8>>
where
    P: image::Pixel + image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, ImageFormat::Png)
        .map_err(|error| PriorError::Encode {
            what: what.to_string(),
            reason: error.to_string(),
        })?;
    Ok(bytes.into_inner())
}

/// A few well-separated colours for the correspondence lines.
fn palette(index: usize) -> Rgb<u8> {
    const COLOURS: [[u8; 3]; 8] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ];
    Rgb(COLOURS[index % COLOURS.len()])
}

/// A straight line in `picture` (sampled every half pixel), clipped to the picture.
fn draw_line(picture: &mut RgbImage, start: (f32, f32), end: (f32, f32), colour: Rgb<u8>) {
    let length = ((end.0 - start.0).powi(2) + (end.1 - start.1).powi(2)).sqrt();
    let samples = (length * 2.0).ceil().max(1.0) as u32;
    for sample in 0..=samples {
        let t = sample as f32 / samples as f32;
        let x = start.0 + t * (end.0 - start.0);
        let y = start.1 + t * (end.1 - start.1);
        if x >= 0.0 && y >= 0.0 && (x as u32) < picture.width() && (y as u32) < picture.height() {
            picture.put_pixel(x as u32, y as u32, colour);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_control_is_normalised_disparity_with_a_black_background() {
        let depth = DepthMap {
            width: 3,
            height: 1,
            depth: vec![0.0, 1.0, 2.0],
        };
        // Disparities 1 and 0.5: the nearest maps to 1, the farthest to 0.
        assert_eq!(depth_control(&depth), vec![0.0, 1.0, 0.0]);
        let depth = DepthMap {
            width: 4,
            height: 1,
            depth: vec![1.0, 0.0, 4.0, 2.0],
        };
        let values = depth_control(&depth);
        assert_eq!(values[1], 0.0);
        assert!((values[3] - 1.0 / 3.0).abs() < 1e-6);
        let png = depth_control_png(&depth).unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(decoded.as_raw(), &vec![255, 0, 0, 85]);
        let mask = image::load_from_memory(&mask_png(&depth).unwrap())
            .unwrap()
            .to_luma8();
        assert_eq!(mask.as_raw(), &vec![255, 0, 255, 255]);
    }
}
