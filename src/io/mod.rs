//! Moving pictures in and out: image files and encoded frames <-> tensors.
pub mod camera;
pub mod image;
