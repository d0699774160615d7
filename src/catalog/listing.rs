//! The catalog as a list, for `imagegate models`, `GET /admin/v1/models` and `imagegate usage
//! --model-status`: each model with its status on a given day, its dates, its replacement, where its entry
//! comes from, how it is priced and which aliases lead to it.

use serde::Serialize;

use super::{Catalog, Date, Price, Source, Status};

/// One model as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    pub id: String,
    /// `model`, as in OpenAI's lists.
    pub object: &'static str,
    /// By its dates, on the day asked about.
    pub status: Status,
    /// Whether the dates act at the edge (warning headers, 404 after shutdown): always for dates the operator
    /// declared, for the built-in (OpenAI's) dates per `validation.builtin_lifecycle`.
    pub lifecycle_enforced: bool,
    pub deprecated_on: Option<Date>,
    pub shutdown_on: Option<Date>,
    pub replacement: Option<String>,
    pub source: Source,
    pub endpoints: Vec<String>,
    /// `per_token`, `per_image` or `none`.
    pub price: &'static str,
    /// Requested names that `[models.aliases]` moves to this model.
    pub aliases: Vec<String>,
}

impl Catalog {
    /// Every model, by id, as of `today`. `builtin_lifecycle`: whether the built-in catalog's dates apply.
    pub fn listing(&self, today: Date, builtin_lifecycle: bool) -> Vec<Listing> {
        self.models()
            .map(|m| Listing {
                id: m.id.clone(),
                object: "model",
                status: m.lifecycle.status(today),
                lifecycle_enforced: m.lifecycle_source == Source::Config || builtin_lifecycle,
                deprecated_on: m.lifecycle.deprecated_on,
                shutdown_on: m.lifecycle.shutdown_on,
                replacement: m.lifecycle.replacement.clone(),
                source: m.source,
                endpoints: m.endpoints.clone(),
                price: match m.price {
                    Some(Price::PerToken(_)) => "per_token",
                    Some(Price::PerImage(_)) => "per_image",
                    None => "none",
                },
                aliases: self.aliases().iter().filter(|(_, to)| **to == m.id).map(|(from, _)| from.clone()).collect(),
            })
            .collect()
    }

    /// The status of `model` on `today` by its dates (following an alias); `None` for models not in the catalog.
    pub fn status_of(&self, model: &str, today: Date) -> Option<Status> {
        let id = self.alias(model).unwrap_or(model);
        self.get(id).map(|m| m.lifecycle.status(today))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ModelsSettings;

    #[test]
    fn the_listing_shows_status_source_price_and_aliases() {
        let settings: ModelsSettings = toml::from_str(
            r#"
            [aliases]
            "old-name" = "gpt-image-2"
            ["house-model"]
            extends = "gpt-image-2"
            shutdown_on = "2030-01-01"
            "#,
        )
        .unwrap();
        let catalog = Catalog::build(&settings).unwrap();
        let today = Date::parse("2026-12-06").unwrap();
        let list = catalog.listing(today, false);
        let get = |id: &str| list.iter().find(|l| l.id == id).unwrap();
        assert_eq!((get("gpt-image-1").status, get("gpt-image-1").lifecycle_enforced), (Status::ShutDown, false));
        assert_eq!(get("gpt-image-2").status, Status::Active);
        assert_eq!(get("gpt-image-2").aliases, ["old-name"]);
        let house = get("house-model");
        assert_eq!((house.status, house.lifecycle_enforced, house.source), (Status::Deprecated, true, Source::Config));
        assert_eq!(house.price, "per_token");
        assert_eq!(catalog.status_of("old-name", today), Some(Status::Active));
        assert_eq!(catalog.status_of("flux-pro", today), None);
        let json = serde_json::to_value(house).unwrap();
        assert_eq!(json["shutdown_on"], "2030-01-01");
        assert_eq!(json["status"], "deprecated");
    }
}
