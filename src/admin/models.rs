//! `GET /admin/v1/models`: the model catalog with each model's status today (`docs/models.md`).

use axum::Json;
use axum::extract::State;

use super::handlers::List;
use crate::catalog::{Date, Listing};
use crate::state::AppState;

/// `GET /admin/v1/models`
pub async fn list_models(State(state): State<AppState>) -> Json<List<Listing>> {
    let policy = state.images.policy();
    List::of(policy.catalog.listing(Date::today(), policy.builtin_lifecycle))
}
