//! The request model: what an image request is once parsed (`request`, `multipart`), the models and their
//! rules (`models`, `validate`), what uploaded files really are (`imageinfo`), and what an upstream answer may
//! be (`answer`: its size and image count). No I/O: the pipeline that runs requests is `crate::pipeline`.

pub mod answer;
pub mod imageinfo;
pub mod models;
pub mod multipart;
pub mod request;
pub mod validate;
