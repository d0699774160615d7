//! Chained edits: an edit whose input is one of imagegate's own image links (an image re-hosted earlier, given
//! as a JSON edit's `images[i].image_url` / `mask.image_url`, or as a multipart `image` / `image[]` / `mask`
//! text part carrying the URL). The upstream cannot reach the gateway's links, so each is resolved from the
//! gateway's own storage and sent upstream as bytes: a `data:` URL in the JSON body, a file part in a form.
//! The link's signature and expiry are checked, and a link to another tenant's image is refused.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::Value;

use super::Rehoster;
use super::links::LinkError;
use crate::domain::Tenant;
use crate::error::ApiError;
use crate::images::request::{Endpoint, ImageRequest, RequestBody, is_image_field};

impl Rehoster {
    /// `request` with every imagegate link among an edit's inputs replaced by the image's bytes; `None` when
    /// it holds none (the caller's bytes go on unchanged). Links of other hosts are left for the upstream.
    pub async fn resolve_own_links(
        &self,
        request: &ImageRequest,
        tenant: &Tenant,
    ) -> Result<Option<ImageRequest>, ApiError> {
        if request.endpoint != Endpoint::Edits || !self.has_own_link(request) {
            return Ok(None);
        }
        let ImageRequest { endpoint, body } = request.clone();
        let body = match body {
            RequestBody::Json { raw, mut fields } => {
                let mut changed = false;
                if let Some(Value::Array(items)) = fields.get_mut("images") {
                    for (i, item) in items.iter_mut().enumerate() {
                        changed |= Box::pin(self.resolve_ref(item, &format!("images[{i}].image_url"), tenant)).await?;
                    }
                }
                if let Some(mask) = fields.get_mut("mask") {
                    changed |= Box::pin(self.resolve_ref(mask, "mask.image_url", tenant)).await?;
                }
                // The body is written from the fields when it goes upstream.
                RequestBody::Json { raw: if changed { None } else { raw }, fields }
            }
            RequestBody::Multipart { mut form } => {
                for part in form.parts.iter_mut().filter(|p| !p.is_file()) {
                    if !(is_image_field(&part.name) || part.name == "mask") {
                        continue;
                    }
                    let Some(text) = part.data.text() else { continue };
                    if let Some((bytes, mime)) = Box::pin(self.own_image(text.trim(), &part.name, tenant)).await? {
                        let ext = mime.rsplit('/').next().unwrap_or("png").replace("jpeg", "jpg");
                        part.file_name = Some(format!("image.{ext}"));
                        part.content_type = Some(mime);
                        part.data = bytes.into();
                    }
                }
                RequestBody::Multipart { form }
            }
        };
        Ok(Some(ImageRequest { endpoint, body }))
    }

    /// Whether an input of the edit is an imagegate link (checked without copying anything).
    fn has_own_link(&self, request: &ImageRequest) -> bool {
        let own = |text: &str| self.links.parse_own(text.trim()).is_some();
        match &request.body {
            RequestBody::Json { fields, .. } => {
                let images = fields.get("images").and_then(Value::as_array).into_iter().flatten();
                images
                    .chain(fields.get("mask"))
                    .any(|item| item.get("image_url").and_then(Value::as_str).is_some_and(own))
            }
            RequestBody::Multipart { form, .. } => form.parts.iter().any(|p| {
                !p.is_file() && (is_image_field(&p.name) || p.name == "mask") && p.data.text().is_some_and(own)
            }),
        }
    }

    /// Replace an `{image_url}` reference to an imagegate link by a `data:` URL of its bytes.
    async fn resolve_ref(&self, item: &mut Value, param: &str, tenant: &Tenant) -> Result<bool, ApiError> {
        let Some(Value::String(url)) = item.get("image_url") else { return Ok(false) };
        let Some((bytes, mime)) = self.own_image(url, param, tenant).await? else { return Ok(false) };
        let data = format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
        if let Some(obj) = item.as_object_mut() {
            obj.insert("image_url".to_owned(), Value::String(data));
        }
        Ok(true)
    }

    /// The bytes and type of the image `link` names, when it is an imagegate link; refused when its signature
    /// is wrong, it has expired, the image is gone or belongs to another tenant.
    async fn own_image(&self, link: &str, param: &str, tenant: &Tenant) -> Result<Option<(Bytes, String)>, ApiError> {
        let Some((name, expires, signature)) = self.links.parse_own(link) else { return Ok(None) };
        let now = i64::try_from(crate::time::now_secs()).unwrap_or(i64::MAX);
        self.links.verify(&name, expires.as_deref(), signature.as_deref(), now).map_err(|e| {
            refused(
                param,
                match e {
                    LinkError::BadSignature => "this imagegate image link's signature is missing or wrong",
                    LinkError::Expired => "this imagegate image link has expired",
                },
            )
        })?;
        let id = name.split_once('.').map_or(name.as_str(), |(id, _)| id);
        let gone = || refused(param, "the image this imagegate link names no longer exists");
        let image = self.store.find(id).await.map_err(|e| ApiError::Internal(e.into()))?.ok_or_else(gone)?;
        if image.tenant_id != tenant.id {
            return Err(refused(param, "this imagegate image link belongs to another tenant"));
        }
        let bytes = self.store.read_all(&image).await.map_err(|_| gone())?;
        Ok(Some((bytes, image.content_type.clone())))
    }
}

fn refused(param: &str, reason: &str) -> ApiError {
    ApiError::invalid_code(format!("Invalid '{param}': {reason}."), Some(param), "invalid_image_url")
}
