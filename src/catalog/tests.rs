//! The catalog: the built-in file resolves, inheritance and overlays behave, and every fault is listed.

use serde_json::json;

use super::*;

fn operator(toml_text: &str) -> ModelsSettings {
    toml::from_str(toml_text).unwrap()
}

#[test]
fn the_builtin_catalog_resolves_without_faults() {
    let catalog = Catalog::build(&ModelsSettings::default()).unwrap_or_else(|f| panic!("{f:#?}"));
    assert!(catalog.models().count() >= 8);
    assert_eq!(Catalog::builtin().ids().count(), catalog.ids().count());
    assert!(catalog.implied_by_parameters().is_some());
    for m in catalog.models() {
        assert!(m.price.is_some(), "{} has no price", m.id);
        assert_eq!(m.source, Source::Builtin);
    }
}

#[test]
fn a_snapshot_inherits_everything_but_its_lifecycle() {
    let catalog = Catalog::builtin();
    let (parent, child) = (catalog.get("gpt-image-2").unwrap(), catalog.get("gpt-image-2-2026-04-21").unwrap());
    assert_eq!((&child.sizes, &child.free_sizes, &child.params), (&parent.sizes, &parent.free_sizes, &parent.params));
    assert_eq!(child.price, parent.price);
    // gpt-image-1's shutdown is not gpt-image-2's.
    assert!(catalog.get("gpt-image-1").unwrap().lifecycle.shutdown_on.is_some());
    assert_eq!(parent.lifecycle, Lifecycle::default());
    // `false` drops an inherited parameter.
    assert!(catalog.get("gpt-image-1").unwrap().param("input_fidelity").is_some());
    assert!(parent.param("input_fidelity").is_none());
}

#[test]
fn an_operator_declares_a_snapshot_in_one_line_and_overrides_a_price_key() {
    let settings = operator(
        r#"
        "gpt-image-2-2026-11-02" = { extends = "gpt-image-2", price = { per_token = { text_input = 4, text_input_cached = 1, image_input = 7, image_input_cached = 1, image_output = 25, text_output = 9, output_tokens = "formula" } } }
        [aliases]
        "gpt-image-1" = "gpt-image-2-2026-11-02"
        ["gpt-image-1.5"]
        shutdown_on = "2027-01-15"
        "#,
    );
    let catalog = Catalog::build(&settings).unwrap_or_else(|f| panic!("{f:#?}"));
    let snap = catalog.get("gpt-image-2-2026-11-02").unwrap();
    assert_eq!(snap.source, Source::Config);
    assert!(matches!(&snap.price, Some(Price::PerToken(p)) if p.image_output == 25.0));
    assert_eq!(snap.free_sizes, catalog.get("gpt-image-2").unwrap().free_sizes);
    assert_eq!(catalog.alias("gpt-image-1"), Some("gpt-image-2-2026-11-02"));
    let moved = catalog.get("gpt-image-1.5").unwrap();
    assert_eq!(moved.lifecycle.shutdown_on, Date::parse("2027-01-15"));
    assert_eq!(moved.lifecycle.deprecated_on, Date::parse("2026-06-02"), "the rest of the entry stays");
    assert_eq!(moved.source, Source::Config);
}

#[test]
fn every_fault_is_listed_at_once() {
    let settings = operator(
        r#"
        [aliases]
        "old" = "nowhere"
        "self" = "self"
        ["a"]
        extends = "b"
        ["b"]
        extends = "a"
        ["orphan"]
        extends = "missing"
        ["bad"]
        endpoints = ["generations", "painting"]
        answers = "b64_json"
        prompt_max = 0
        n_max = 0
        sizes = ["big"]
        params = { quality = [], output_compression = { min = 5, max = 1 } }
        deprecated_on = "2027-02-30"
        shutdown_on = "soon"
        replacement = "gpt-image-9"
        price = { per_image = { standard = { "1024*1024" = -1 } } }
        ["typo"]
        extends = "gpt-image-2"
        size = ["1024x1024"]
        "#,
    );
    let faults = Catalog::build(&settings).unwrap_err();
    let has = |needle: &str| faults.iter().any(|f| f.contains(needle));
    for needle in [
        "models.aliases.\"old\"",
        "names itself",
        "cycle",
        "\"missing\", which is not a model",
        "\"painting\" is not one of",
        "prompt_max must be at least 1",
        "n_max must be between",
        "\"big\" is not WIDTHxHEIGHT",
        "params.quality: an empty list",
        "min 5 is above max 1",
        "\"2027-02-30\" is not a date",
        "\"soon\" is not a date",
        "size is not WxH",
        "is negative",
        "unknown field `size`",
    ] {
        assert!(has(needle), "no fault mentions {needle:?} in {faults:#?}");
    }
}

#[test]
fn a_brand_new_model_is_declared_from_scratch() {
    let settings = operator(
        r#"
        ["acme-image-7"]
        endpoints = ["generations"]
        answers = "b64_json"
        prompt_max = 2000
        n_max = 4
        sizes = ["1024x1024"]
        params = { quality = ["draft", "final"] }
        defaults = { quality = "draft" }
        price = { per_image = { draft = { "1024x1024" = 0.01 }, final = { "1024x1024" = 0.05 } } }
        sure = { "params.quality" = "reported" }
        "#,
    );
    let catalog = Catalog::build(&settings).unwrap_or_else(|f| panic!("{f:#?}"));
    let m = catalog.get("acme-image-7").unwrap();
    assert_eq!((m.n_max, m.prompt_max), (4, 2000));
    assert!(!m.enforces("params.quality") && m.enforces("sizes"));
    let long = "x".repeat(80);
    for name in ["quality", "style", "background", long.as_str()] {
        assert_eq!(m.enforces_param(name), m.enforces(&format!("params.{name}")), "{name}");
    }
    assert_eq!(m.defaults.get("quality"), Some(&json!("draft")));
    assert!(catalog.knows_param("quality") && !catalog.knows_param("frame_count"));
}

#[test]
fn a_tenants_own_aliases_come_first_and_are_checked_like_the_deployments() {
    let settings = operator(
        r#"
        [aliases]
        "gpt-image-1" = "gpt-image-2"
        [tenant_aliases."team-a"]
        "gpt-image-1" = "gpt-image-1.5"
        [tenant_aliases."team-b"]
        "old" = "nowhere"
        "#,
    );
    let faults = Catalog::build(&settings).unwrap_err();
    assert!(faults.iter().any(|f| f.contains("models.tenant_aliases.\"team-b\".\"old\"")), "{faults:#?}");
    let settings = operator(
        r#"
        [aliases]
        "gpt-image-1" = "gpt-image-2"
        [tenant_aliases."team-a"]
        "gpt-image-1" = "gpt-image-1.5"
        "#,
    );
    let catalog = Catalog::build(&settings).unwrap();
    assert_eq!(catalog.alias_for(Some("team-a"), "gpt-image-1"), Some("gpt-image-1.5"));
    assert_eq!(catalog.alias_for(Some("team-b"), "gpt-image-1"), Some("gpt-image-2"));
    assert_eq!(catalog.alias_for(None, "gpt-image-1"), Some("gpt-image-2"));
    assert_eq!(catalog.alias_for(Some("team-a"), "gpt-image-2"), None);
}
