#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]
//! Table-driven over the model catalog (issue 14): for every built-in model, the requests its own catalog
//! entry says it accepts are accepted and the ones it says it refuses are refused naming the parameter. The
//! table is generated from the data (`config/models.toml`), so a model added there is tested without a line
//! of test code; the tricky rules (free sizes, ratio bounds, quality tiers, how sure a rule is) follow by hand.

use std::sync::Arc;

use bytes::Bytes;
use imagegate::catalog::{Catalog, Model, ModelsSettings, Param};
use imagegate::images::request::{Endpoint, Form, ImageRequest, Part};
use imagegate::images::validate::{ValidationPolicy, validate};
use serde_json::{Map, Value, json};

fn generation(body: &Value) -> ImageRequest {
    ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_string())).unwrap()
}

fn png(side: u32) -> Bytes {
    let img = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(side, side, image::Rgba([1, 2, 3, 0])));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    Bytes::from(out.into_inner())
}

fn text(name: &str, value: &str) -> Part {
    Part { name: name.into(), file_name: None, content_type: None, data: Bytes::from(value.to_owned()).into() }
}

fn form(endpoint: Endpoint, model: &str) -> ImageRequest {
    let mut parts = vec![
        text("model", model),
        Part {
            name: "image".into(),
            file_name: Some("a.png".into()),
            content_type: Some("image/png".into()),
            data: png(64).into(),
        },
    ];
    if endpoint == Endpoint::Edits {
        parts.push(text("prompt", "x"));
    }
    ImageRequest::from_form(endpoint, Form { parts })
}

fn policy(catalog: Arc<Catalog>) -> ValidationPolicy {
    ValidationPolicy { catalog, ..ValidationPolicy::default() }
}

/// `Ok` or the refusal's `(param, code)`.
fn verdict(request: &ImageRequest, policy: &ValidationPolicy) -> Result<(), (String, String)> {
    validate(request, policy)
        .map(|_| ())
        .map_err(|e| (e.param().unwrap_or_default().to_owned(), e.code().unwrap_or_default().to_owned()))
}

fn with(m: &Model, fields: Value) -> Value {
    let mut body = json!({"model": m.id, "prompt": "x"});
    if let (Value::Object(b), Value::Object(f)) = (&mut body, fields) {
        b.extend(f);
    }
    body
}

/// Fields a value needs beside it to be valid on its own (a compression below 100 needs a lossy format).
fn companions(m: &Model, name: &str) -> Map<String, Value> {
    let mut extra = Map::new();
    if name == "output_compression"
        && matches!(m.param("output_format"), Some(Param::Values(v)) if v.iter().any(|f| f == "jpeg"))
    {
        extra.insert("output_format".into(), json!("jpeg"));
    }
    extra
}

#[test]
fn every_builtin_model_accepts_what_its_entry_allows_and_refuses_the_rest() {
    let catalog = Catalog::builtin();
    let policy = policy(catalog.clone());
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut expect = |label: String, request: ImageRequest, want: Result<(), (&str, &str)>| {
        checked += 1;
        let got = verdict(&request, &policy);
        let want = want.map_err(|(p, c)| (p.to_owned(), c.to_owned()));
        if got != want {
            failures.push(format!("{label}: expected {want:?}, got {got:?}"));
        }
    };
    for m in catalog.models() {
        let id = &m.id;
        // Endpoints.
        if m.serves("generations") {
            expect(format!("{id} generation"), generation(&with(m, json!({}))), Ok(()));
        } else {
            expect(format!("{id} generation"), generation(&with(m, json!({}))), Err(("model", "invalid_value")));
        }
        for endpoint in [Endpoint::Edits, Endpoint::Variations] {
            let want = if m.serves(endpoint.name()) { Ok(()) } else { Err(("model", "invalid_value")) };
            expect(format!("{id} {}", endpoint.name()), form(endpoint, id), want);
        }
        if !m.serves("generations") {
            continue;
        }
        // Prompt length, in characters.
        let at_most = "é".repeat(m.prompt_max);
        expect(format!("{id} prompt at its limit"), generation(&with(m, json!({"prompt": at_most}))), Ok(()));
        let over = "é".repeat(m.prompt_max + 1);
        expect(
            format!("{id} prompt over its limit"),
            generation(&with(m, json!({"prompt": over}))),
            Err(("prompt", "string_above_max_length")),
        );
        // n.
        expect(format!("{id} n = n_max"), generation(&with(m, json!({"n": m.n_max}))), Ok(()));
        expect(
            format!("{id} n = n_max + 1"),
            generation(&with(m, json!({"n": m.n_max + 1}))),
            Err(("n", "integer_above_max_value")),
        );
        // Sizes: every listed one; one that no rule allows.
        for size in &m.sizes {
            expect(format!("{id} size {size}"), generation(&with(m, json!({"size": size}))), Ok(()));
        }
        expect(
            format!("{id} size 17x17"),
            generation(&with(m, json!({"size": "17x17"}))),
            Err(("size", "invalid_value")),
        );
        // Parameters it takes: every allowed value, and one outside.
        for (name, param) in m.params.iter().filter(|(n, _)| m.param(n).is_some()) {
            let extra = companions(m, name);
            let body = |value: Value| {
                let mut fields = extra.clone();
                fields.insert(name.clone(), value);
                generation(&with(m, Value::Object(fields)))
            };
            match param {
                Param::Values(values) => {
                    for v in values {
                        expect(format!("{id} {name} = {v}"), body(json!(v)), Ok(()));
                    }
                    expect(format!("{id} {name} = bogus"), body(json!("bogus-value")), Err((name, "invalid_value")));
                }
                Param::Range { min, max } => {
                    expect(format!("{id} {name} = {min}"), body(json!(min)), Ok(()));
                    expect(format!("{id} {name} = {max}"), body(json!(max)), Ok(()));
                    expect(
                        format!("{id} {name} = max + 1"),
                        body(json!(max + 1)),
                        Err((name, "integer_above_max_value")),
                    );
                }
                Param::Taken(_) => expect(format!("{id} {name} = true"), body(json!(true)), Ok(())),
            }
        }
        // Parameters other models take and this one does not: unsupported, with a value another model takes.
        for other in catalog.models() {
            for (name, param) in &other.params {
                if m.param(name).is_some() || name == "response_format" {
                    continue;
                }
                let value = match param {
                    Param::Values(v) => json!(v[0]),
                    Param::Range { min, .. } => json!(min),
                    Param::Taken(true) => json!(true),
                    Param::Taken(false) => continue,
                };
                expect(
                    format!("{id} without {name}"),
                    generation(&with(m, json!({ name: value }))),
                    Err((name, "unsupported_parameter")),
                );
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} cases failed:\n{}", failures.len(), failures.join("\n"));
    assert!(checked > 300, "only {checked} cases: is the catalog empty?");
}

fn operator_catalog(toml_text: &str) -> Arc<Catalog> {
    let settings: ModelsSettings = toml::from_str(toml_text).unwrap();
    Arc::new(Catalog::build(&settings).unwrap_or_else(|f| panic!("{f:#?}")))
}

#[test]
fn free_sizes_accept_every_bound_exactly_and_refuse_one_step_beyond() {
    let policy = policy(Catalog::builtin());
    let size = |s: &str| verdict(&generation(&json!({"model": "gpt-image-2", "prompt": "x", "size": s})), &policy);
    for ok in ["3072x1024", "1024x3072", "3840x1280", "2880x2880", "1024x640", "3840x2160", "1536x864"] {
        assert_eq!(size(ok), Ok(()), "{ok}");
    }
    for (bad, why) in [
        ("3088x1024", "ratio just above 3:1"),
        ("1024x3088", "ratio just above 1:3"),
        ("3856x1296", "long edge 3856"),
        ("2896x2880", "pixels above 8,294,400"),
        ("1008x640", "pixels below 655,360"),
        ("1030x1030", "not multiples of 16"),
    ] {
        assert_eq!(size(bad), Err(("size".into(), "invalid_value".into())), "{bad}: {why}");
    }
    // The listed sizes of other models do not leak in: gpt-image-1 takes only its list.
    let listed = verdict(&generation(&json!({"model": "gpt-image-1", "prompt": "x", "size": "1536x864"})), &policy);
    assert_eq!(listed, Err(("size".into(), "invalid_value".into())));
}

#[test]
fn a_newer_family_adds_quality_tiers_and_its_own_free_size_bounds_in_config_only() {
    let catalog = operator_catalog(
        r#"
        ["gpt-image-2.6"]
        extends = "gpt-image-2"
        params = { quality = ["low", "medium", "high", "xhigh", "max", "auto"], complexity = ["low", "medium", "high"] }
        free_sizes = { multiple = 32, max_ratio = 4, max_edge = 4096, min_pixels = 655360, max_pixels = 16777216 }
        "#,
    );
    let policy = policy(catalog);
    let check = |fields: Value| {
        let mut body = json!({"model": "gpt-image-2.6", "prompt": "x"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        verdict(&generation(&body), &policy)
    };
    assert_eq!(check(json!({"quality": "xhigh"})), Ok(()));
    assert_eq!(check(json!({"quality": "max", "complexity": "high"})), Ok(()));
    assert_eq!(check(json!({"size": "4096x1024"})), Ok(()), "4:1 within its own bounds");
    assert_eq!(check(json!({"size": "4096x4096"})), Ok(()));
    assert_eq!(check(json!({"size": "1040x1040"})), Err(("size".into(), "invalid_value".into())), "multiples of 32");
    assert_eq!(check(json!({"quality": "ultra"})), Err(("quality".into(), "invalid_value".into())));
    // The parent keeps its own tiers, and now knows `complexity` as a parameter it does not take.
    let parent = |fields: Value| {
        let mut body = json!({"model": "gpt-image-2", "prompt": "x"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        verdict(&generation(&body), &policy)
    };
    assert_eq!(parent(json!({"quality": "xhigh"})), Err(("quality".into(), "invalid_value".into())));
    assert_eq!(parent(json!({"complexity": "low"})), Err(("complexity".into(), "unsupported_parameter".into())));
}

#[test]
fn a_rule_marked_reported_or_assumed_never_refuses() {
    let catalog = operator_catalog(
        r#"
        ["acme-image"]
        extends = "gpt-image-2"
        params = { quality = ["draft", "final"] }
        n_max = 2
        sure = { "params.quality" = "reported", n_max = "assumed", "params.style" = "assumed" }
        "#,
    );
    let policy = policy(catalog);
    let check = |fields: Value| {
        let mut body = json!({"model": "acme-image", "prompt": "x"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        verdict(&generation(&body), &policy)
    };
    assert_eq!(check(json!({"quality": "whatever"})), Ok(()), "forwarded for the upstream to judge");
    assert_eq!(check(json!({"n": 5})), Ok(()));
    assert_eq!(check(json!({"style": "vivid"})), Ok(()));
    assert_eq!(
        check(json!({"n": 11})),
        Err(("n".into(), "integer_above_max_value".into())),
        "the schema's bound holds"
    );
    assert_eq!(check(json!({"size": "17x17"})), Err(("size".into(), "invalid_value".into())), "documented rules hold");
}

#[test]
fn quality_auto_is_accepted_by_every_model_that_takes_quality() {
    let catalog = Catalog::builtin();
    let policy = policy(catalog.clone());
    for m in catalog.models().filter(|m| m.serves("generations") && m.param("quality").is_some()) {
        let body = json!({"model": m.id, "prompt": "x", "quality": "auto"});
        assert_eq!(verdict(&generation(&body), &policy), Ok(()), "{}", m.id);
    }
}
