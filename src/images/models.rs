//! The models the request rules know: entries of the model catalog (`crate::catalog`, built from
//! `config/models.toml` and the operator's `[models]`). No model is named in code; everything a rule needs
//! about a model is a field of [`Model`].

pub use crate::catalog::{Answers, Catalog, FileRules, Model, Param, Sure};

use super::request::Endpoint;

/// Whether `model` serves `endpoint`.
pub fn serves(model: &Model, endpoint: Endpoint) -> bool {
    model.serves(endpoint.name())
}
