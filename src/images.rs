//! The request model: what an image request is once parsed (`request`, `multipart`), the models and their
//! rules (`models`, `validate`), and what uploaded files really are (`imageinfo`). No I/O: the pipeline that
//! runs requests is `crate::pipeline`.

pub mod imageinfo;
pub mod models;
pub mod multipart;
pub mod request;
pub mod validate;
