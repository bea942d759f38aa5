//! The object crop DINOv2 compares: the square bounding box of an image's foreground mask.
//!
//! Rule (the same in the fixture script's reference): foreground pixels are those above 127 (so
//! a JPEG-compressed mask's ringing does not grow the box); the box is the tightest one around
//! them, made square by growing its shorter side about its centre (any odd pixel goes to the far
//! side), then shifted to lie inside the image; where the square is larger than the image along
//! an axis, that axis takes the whole image (the crop is then not square). The background is not
//! masked out.
//!
//! Defined edge cases: an empty mask (no foreground pixel) crops the whole image, so the image
//! still gets an embedding instead of failing the group; a mask covering the whole image crops
//! the whole image by the same rule.

use image::GrayImage;

/// Mask values above this count as foreground.
pub const FOREGROUND_THRESHOLD: u8 = 127;

/// A rectangle of an image in pixels: `left..left + width`, `top..top + height`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// The object crop of an image whose foreground mask is `mask` (same size as the image).
pub fn object_crop_box(mask: &GrayImage) -> CropBox {
    let (width, height) = mask.dimensions();
    let mut bounds: Option<(u32, u32, u32, u32)> = None;
    for (x, y, pixel) in mask.enumerate_pixels() {
        if pixel.0[0] > FOREGROUND_THRESHOLD {
            let (left, top, right, bottom) = bounds.get_or_insert((x, y, x + 1, y + 1));
            *left = (*left).min(x);
            *top = (*top).min(y);
            *right = (*right).max(x + 1);
            *bottom = (*bottom).max(y + 1);
        }
    }
    let Some((left, top, right, bottom)) = bounds else {
        return CropBox {
            left: 0,
            top: 0,
            width,
            height,
        };
    };
    let side = (right - left).max(bottom - top);
    let (x0, crop_width) = square_span(left, right, side, width);
    let (y0, crop_height) = square_span(top, bottom, side, height);
    CropBox {
        left: x0,
        top: y0,
        width: crop_width,
        height: crop_height,
    }
}

/// Grows `start..end` to `side` about its centre and shifts it into `0..limit`; the whole
/// `0..limit` when `side` does not fit. Returns `(start, length)`.
fn square_span(start: u32, end: u32, side: u32, limit: u32) -> (u32, u32) {
    if side >= limit {
        return (0, limit);
    }
    let grow_before = (side - (end - start)) / 2;
    let begin = start.saturating_sub(grow_before).min(limit - side);
    (begin, side)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    fn mask_with(width: u32, height: u32, rect: (u32, u32, u32, u32)) -> GrayImage {
        let (x0, y0, x1, y1) = rect;
        GrayImage::from_fn(width, height, |x, y| {
            Luma([if x >= x0 && x < x1 && y >= y0 && y < y1 {
                255
            } else {
                0
            }])
        })
    }

    #[test]
    fn a_wide_box_grows_vertically_about_its_centre() {
        // Box x 40..60 (20 wide), y 45..55 (10 tall): square of 20, y from 40.
        let crop = object_crop_box(&mask_with(100, 100, (40, 45, 60, 55)));
        assert_eq!(
            crop,
            CropBox {
                left: 40,
                top: 40,
                width: 20,
                height: 20
            }
        );
    }

    #[test]
    fn odd_growth_puts_the_extra_pixel_on_the_far_side() {
        // 10 wide, 7 tall: grow 3 rows, 1 before and 2 after.
        let crop = object_crop_box(&mask_with(50, 50, (10, 20, 20, 27)));
        assert_eq!(
            crop,
            CropBox {
                left: 10,
                top: 19,
                width: 10,
                height: 10
            }
        );
    }

    #[test]
    fn squares_near_an_edge_are_shifted_inside() {
        // Box x 0..4, y 10..40 (30 tall): the square 30 wide would start at -13, shifts to 0.
        let crop = object_crop_box(&mask_with(100, 50, (0, 10, 4, 40)));
        assert_eq!(
            crop,
            CropBox {
                left: 0,
                top: 10,
                width: 30,
                height: 30
            }
        );
        // Near the right edge: starts at 100 - 30 = 70.
        let crop = object_crop_box(&mask_with(100, 50, (96, 10, 100, 40)));
        assert_eq!(crop.left, 70);
    }

    #[test]
    fn a_square_larger_than_the_image_takes_the_whole_axis() {
        // Box 90 wide in an image 40 tall: the square does not fit vertically.
        let crop = object_crop_box(&mask_with(100, 40, (5, 10, 95, 20)));
        assert_eq!(
            crop,
            CropBox {
                left: 5,
                top: 0,
                width: 90,
                height: 40
            }
        );
    }

    #[test]
    fn an_empty_mask_crops_the_whole_image() {
        let crop = object_crop_box(&GrayImage::new(30, 20));
        assert_eq!(
            crop,
            CropBox {
                left: 0,
                top: 0,
                width: 30,
                height: 20
            }
        );
        // Values at or below the threshold are background.
        let faint = GrayImage::from_pixel(30, 20, Luma([FOREGROUND_THRESHOLD]));
        assert_eq!(object_crop_box(&faint), crop);
    }

    #[test]
    fn a_full_mask_crops_the_whole_image() {
        let full = GrayImage::from_pixel(30, 20, Luma([255]));
        assert_eq!(
            object_crop_box(&full),
            CropBox {
                left: 0,
                top: 0,
                width: 30,
                height: 20
            }
        );
    }
}
