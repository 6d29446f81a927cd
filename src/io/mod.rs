//! Moving pictures in and out: image files and encoded frames <-> tensors.
pub mod image;
