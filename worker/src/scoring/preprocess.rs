//! Image preprocessing for the scoring models, matching transformers' image processors.
//!
//! The reference is what `AutoImageProcessor.from_pretrained` gives a user of transformers 5.24
//! with torchvision installed: the torchvision backend of `BitImageProcessor` (DINOv2) and
//! `CLIPImageProcessor`. Per image it resizes the uint8 image so that its shortest edge is
//! `resize_shortest_edge` (the long edge `int(size * long / short)`), bicubic with antialiasing
//! (torch's uint8 kernel on the CPU, the PIL-like separable filter), centre-crops
//! `crop x crop` (top-left offset `int((size - crop) / 2)`), and normalises in float32 as
//! `(x - 255 mean) / (255 std)`.
//!
//! This module runs the same libtorch kernels on the CPU and so matches that reference bit for
//! bit. The PIL backend (`BitImageProcessorPil`, what a user without torchvision gets) resamples
//! with PIL and differs from it by at most one uint8 level on a few pixels (max abs 0.0175 on the
//! normalised values, recorded by the fixture script in `preprocess/backends.json`).
//! Resizing always runs on the CPU, where the reference runs it too: torchvision on a GPU goes
//! through float32 and rounds, which is not bit-identical. Images of one size are resized in one
//! call, and normalisation runs on the models' device.

use anyhow::{ensure, Context, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// ImageNet statistics (DINOv2).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// OpenAI CLIP statistics.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)] // the published constants, digit for digit
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Resize, centre-crop and normalisation settings of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// The shortest edge after resizing.
    pub resize_shortest_edge: i64,
    /// The side of the square centre crop.
    pub crop: i64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// DINOv2's processor (`facebook/dinov2-*`): shortest edge 256, crop 224, ImageNet statistics.
    pub fn dinov2() -> Self {
        Self {
            resize_shortest_edge: 256,
            crop: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// CLIP's processor (`openai/clip-vit-large-patch14`): shortest edge 224, crop 224.
    pub fn clip() -> Self {
        Self {
            resize_shortest_edge: 224,
            crop: 224,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.crop > 0 && self.resize_shortest_edge >= self.crop,
            "preprocessing resizes to a shortest edge of {} and crops {}: the crop must be positive \
             and fit in the resized image",
            self.resize_shortest_edge,
            self.crop
        );
        ensure!(
            self.std.iter().all(|s| *s > 0.0),
            "normalisation std must be positive, got {:?}",
            self.std
        );
        Ok(())
    }

    /// The `(height, width)` after resizing an image of `height x width`, as transformers'
    /// `get_resize_output_image_size(default_to_square=False)` computes it.
    pub fn resized_size(&self, height: i64, width: i64) -> (i64, i64) {
        let size = self.resize_shortest_edge;
        let (short, long) = if width <= height {
            (width, height)
        } else {
            (height, width)
        };
        let new_long = ((size * long) as f64 / short as f64) as i64;
        if width <= height {
            (new_long, size)
        } else {
            (size, new_long)
        }
    }

    /// One image, `[3, height, width]` uint8 on the CPU, to `[3, crop, crop]` float32 on the CPU.
    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self
            .batch(std::slice::from_ref(image), Device::Cpu)?
            .squeeze_dim(0))
    }

    /// A batch of `[3, height, width]` uint8 images to `[batch, 3, crop, crop]` float32 on
    /// `device`.
    ///
    /// Images of the same size are resized together, in one call of the kernel (which works on
    /// each image on its own, so the values are those of one call per image); the crops travel
    /// to the device as uint8, a quarter of the bytes, and are normalised there (a subtraction
    /// and a division, correctly rounded on every device, so the same bits as on the CPU).
    pub fn batch(&self, images: &[Tensor], device: Device) -> Result<Tensor> {
        let mut by_size: Vec<((i64, i64), Vec<usize>)> = Vec::new();
        for (index, image) in images.iter().enumerate() {
            let size = image.size();
            ensure!(
                size.len() == 3 && size[0] == 3 && size[1] > 0 && size[2] > 0,
                "image {index} of the batch: expected a [3, height, width] image tensor, got \
                 {size:?}"
            );
            ensure!(
                image.kind() == Kind::Uint8,
                "image {index} of the batch: expected a uint8 image, got {:?}",
                image.kind()
            );
            let key = (size[1], size[2]);
            match by_size.iter_mut().find(|(size, _)| *size == key) {
                Some((_, members)) => members.push(index),
                None => by_size.push((key, vec![index])),
            }
        }
        ensure!(!images.is_empty(), "a batch to preprocess has no images");
        let mut crops = Vec::with_capacity(by_size.len());
        let mut order = Vec::with_capacity(images.len());
        for ((height, width), members) in &by_size {
            let stacked = Tensor::stack(
                &members
                    .iter()
                    .map(|&index| images[index].to_device(Device::Cpu))
                    .collect::<Vec<_>>(),
                0,
            )
            .contiguous();
            crops.push(
                self.resize_and_crop(&stacked, *height, *width)
                    .with_context(|| format!("resizing {height}x{width} images"))?,
            );
            order.extend(members.iter().map(|&index| index as i64));
        }
        // Back to the batch's order: position `i` of the output is image `i`.
        let mut inverse = vec![0i64; images.len()];
        for (position, &index) in order.iter().enumerate() {
            inverse[index as usize] = position as i64;
        }
        let crops = Tensor::cat(&crops, 0).index_select(0, &Tensor::from_slice(&inverse));
        // The reference fuses rescaling into the statistics: float32(mean) * 255 in float32.
        let scaled = |values: [f32; 3]| {
            Tensor::from_slice(&values.map(|v| v * 255.0))
                .view([1, 3, 1, 1])
                .to_device(device)
        };
        Ok((crops.to_device(device).to_kind(Kind::Float) - scaled(self.mean)) / scaled(self.std))
    }

    /// `[B, 3, height, width]` uint8 on the CPU to the `[B, 3, crop, crop]` uint8 centre crops
    /// after resizing.
    fn resize_and_crop(&self, images: &Tensor, height: i64, width: i64) -> Result<Tensor> {
        let (resized_height, resized_width) = self.resized_size(height, width);
        // torchvision returns an image already at the target size untouched.
        let resized = if (resized_height, resized_width) == (height, width) {
            images.shallow_clone()
        } else {
            images.f_internal_upsample_bicubic2d_aa(
                [resized_height, resized_width],
                false,
                None,
                None,
            )?
        };
        let top = (resized_height - self.crop) / 2;
        let left = (resized_width - self.crop) / 2;
        Ok(resized.narrow(2, top, self.crop).narrow(3, left, self.crop))
    }
}

/// An RGB image as a `[3, height, width]` uint8 tensor on the CPU.
pub fn image_tensor(image: &RgbImage) -> Tensor {
    let (width, height) = image.dimensions();
    Tensor::from_slice(image.as_raw())
        .view([height as i64, width as i64, 3])
        .permute([2, 0, 1])
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_follows_the_shortest_edge() {
        let p = Preprocess::dinov2();
        // 317x211 (width x height): 256 * 317 / 211 = 384.6 -> 384.
        assert_eq!(p.resized_size(211, 317), (256, 384));
        assert_eq!(p.resized_size(257, 199), (330, 256));
        assert_eq!(p.resized_size(480, 640), (256, 341));
        assert_eq!(p.resized_size(100, 100), (256, 256));
    }

    #[test]
    fn constant_images_normalise_to_constants() {
        let p = Preprocess::clip();
        let image = RgbImage::from_pixel(50, 30, image::Rgb([255, 0, 128]));
        let values = p.pixel_values(&image_tensor(&image)).unwrap();
        assert_eq!(values.size(), vec![3, 224, 224]);
        let red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        let max = values.get(0).max().double_value(&[]) as f32;
        let min = values.get(0).min().double_value(&[]) as f32;
        assert!(
            (max - red).abs() < 1e-5 && (min - red).abs() < 1e-5,
            "{min} {max} {red}"
        );
    }

    #[test]
    fn bad_settings_and_inputs_are_errors() {
        let mut p = Preprocess::dinov2();
        p.crop = 300;
        assert!(p.validate().is_err());
        let wrong = Tensor::zeros([4, 10, 10], (Kind::Uint8, Device::Cpu));
        assert!(Preprocess::dinov2().pixel_values(&wrong).is_err());
        let float = Tensor::zeros([3, 10, 10], (Kind::Float, Device::Cpu));
        assert!(Preprocess::dinov2().pixel_values(&float).is_err());
    }
}
