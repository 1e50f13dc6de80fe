//! The HTTP side: the organisation admins' API, the proxies' feeds (`GET /v1/registry`, and
//! `GET /v2/registry/changes` in feed.rs) and the dashboard.

use super::auth::{Caller, ProxyToken, Verifier};
use super::feed::{check_entry_size, ChangesFeed};
use super::keys::{new_api_key, new_webhook_id, Sealer};
use super::store::{Audit, Store, StoredWebhook};
use super::validate::{read_fields, FieldError, Policy};
use super::{log, now_ms, rfc3339};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

mod deliveries;
mod proxy_feeds;
mod reports;

use super::rejections::MAX_BODY;
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");
const DASHBOARD_CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub struct App {
    pub store: Store,
    pub verifier: Verifier,
    pub proxy_token: ProxyToken,
    pub sealer: Sealer,
    pub policy: Policy,
    pub deliveries: super::delivery_log::DeliverySettings,
    /// Each organisation's writes through this API (off unless set).
    pub write_limiter: super::write_limit::WriteLimiter,
    /// How long the previous key is still served after a rotation.
    pub rotation_grace_ms: i64,
    feed: Mutex<Option<proxy_feeds::Feed>>,
    changes: ChangesFeed,
}

impl App {
    pub fn new(
        store: Store,
        verifier: Verifier,
        proxy_token: ProxyToken,
        sealer: Sealer,
        policy: Policy,
        rotation_grace_ms: i64,
        changes: ChangesFeed,
    ) -> Self {
        App {
            store,
            verifier,
            proxy_token,
            sealer,
            policy,
            deliveries: Default::default(),
            write_limiter: super::write_limit::WriteLimiter::off(),
            rotation_grace_ms,
            feed: Mutex::new(None),
            changes,
        }
    }

    fn authorize(&self, headers: &HeaderMap, organisation: &str) -> Result<Caller, ApiError> {
        let caller = self
            .verifier
            .caller(
                headers
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes),
            )
            .map_err(ApiError::Unauthorized)?;
        if !is_organisation_id(organisation) {
            return Err(ApiError::NotFound);
        }
        if caller.may_manage(organisation) {
            Ok(caller)
        } else {
            Err(ApiError::Forbidden(format!(
                "role {:?} of organisation {:?} may not manage the webhooks of organisation {organisation:?}",
                caller.role.as_str(),
                caller.organisation_id
            )))
        }
    }
}

impl super::health::HasStore for App {
    fn store(&self) -> &Store {
        &self.store
    }
}

impl super::write_limit::LimitsWrites for App {
    fn write_limiter(&self) -> &super::write_limit::WriteLimiter {
        &self.write_limiter
    }
    fn may_manage(&self, headers: &HeaderMap, organisation: &str) -> bool {
        self.authorize(headers, organisation).is_ok()
    }
}

impl super::refusals::Refusals for App {
    fn store(&self) -> &Store {
        &self.store
    }
    fn verifier(&self) -> &Verifier {
        &self.verifier
    }
}

/// Organisation ids come from the tokens and the paths: 1 to 128 characters, none of them a control character.
fn is_organisation_id(id: &str) -> bool {
    (1..=128).contains(&id.chars().count()) && !id.chars().any(char::is_control)
}

// Webhook ids are the filter's (24 lowercase hex digits); anything else is not looked up.
use crate::config::is_webhook_id;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(dashboard_html))
        .route("/dashboard.js", get(dashboard_js))
        .route("/dashboard.css", get(dashboard_css))
        .route("/healthz", get(super::health::healthz::<App>))
        .route("/v1/event-types", get(event_types))
        .route("/v1/registry", get(proxy_feeds::registry_feed))
        .route("/v2/registry/changes", get(proxy_feeds::registry_changes))
        .route(
            "/v1/organisations/{org}/webhooks",
            get(list_webhooks).post(create_webhook),
        )
        .route(
            "/v1/organisations/{org}/webhooks/{id}",
            get(get_webhook)
                .patch(update_webhook)
                .delete(delete_webhook),
        )
        .route(
            "/v1/organisations/{org}/webhooks/{id}/rotate-key",
            post(rotate_key),
        )
        .route(
            "/v1/organisations/{org}/webhooks/{id}/revoke-previous-key",
            post(revoke_previous_key),
        )
        .route("/v1/settings", get(settings))
        .merge(deliveries::routes())
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            reports::pending_sends_flag,
        ))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(request_deadline))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            super::health::database_guard::<App>,
        ))
        // After the token's check, before the database's.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            super::write_limit::limit_writes::<App>,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(super::rejections::in_error_shape))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            super::refusals::log_and_audit::<App>,
        ))
        .with_state(app)
}

/// A request (its body included) must be read and answered within this time.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

async fn request_deadline(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => json_response(
            StatusCode::REQUEST_TIMEOUT,
            &errors_body(&[FieldError::new("", "the request took too long")]),
        ),
    }
}

pub enum ApiError {
    Unauthorized(String),
    Forbidden(String),
    NotFound,
    Conflict,
    Invalid(Vec<FieldError>),
    /// A revoke of the previous key, when there is none in its grace period.
    NoPreviousKey,
    Internal,
    /// The database is down, unreachable, too slow, or its file is gone: 503.
    Unavailable,
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if super::store::is_unavailable(&e) {
            log(&format!("database unavailable: {e}"));
            return ApiError::Unavailable;
        }
        log(&format!("database error: {e}"));
        ApiError::Internal
    }
}

fn errors_body(errors: &[FieldError]) -> Value {
    json!({"errors": errors.iter().map(|e| json!({"path": e.path, "message": e.message})).collect::<Vec<_>>()})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let one = |status: StatusCode, path: &str, message: &str| {
            json_response(status, &errors_body(&[FieldError::new(path, message)]))
        };
        match self {
            ApiError::Unauthorized(why) => {
                let mut r = one(StatusCode::UNAUTHORIZED, "authorization", &why);
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::Forbidden(why) => one(StatusCode::FORBIDDEN, "authorization", &why),
            ApiError::NotFound => one(StatusCode::NOT_FOUND, "", "no such webhook"),
            ApiError::Conflict => one(
                StatusCode::CONFLICT,
                "",
                "the webhook changed meanwhile; read it again and retry",
            ),
            ApiError::NoPreviousKey => one(
                StatusCode::CONFLICT,
                "",
                "the webhook has no previous key in its grace period (none, or it expired or was revoked)",
            ),
            ApiError::Invalid(errors) => {
                json_response(StatusCode::UNPROCESSABLE_ENTITY, &errors_body(&errors))
            }
            ApiError::Internal => one(StatusCode::INTERNAL_SERVER_ERROR, "", "internal error"),
            ApiError::Unavailable => super::health::unavailable(),
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            // Answers may hold a key: no cache keeps them.
            (header::CACHE_CONTROL, "no-store"),
        ],
        value.to_string(),
    )
        .into_response()
}

fn public(w: &StoredWebhook) -> Value {
    json!({
        "id": w.id,
        "organisationId": w.organisation_id,
        "name": w.name,
        "url": w.url,
        "description": w.description,
        "status": w.status,
        "events": w.events,
        "createdAt": rfc3339(w.created_ms),
        "updatedAt": rfc3339(w.updated_ms),
        "keyRotatedAt": w.key_rotated_ms.map(rfc3339),
        "previousKeyExpiresAt": w.previous_key_expires_ms
            .filter(|expires| w.previous_key_sealed.is_some() && now_ms() < *expires)
            .map(rfc3339),
    })
}

fn audit_line(caller: &Caller, action: &str, organisation: &str, id: &str) {
    log(&format!(
        "{action} webhook {id} of organisation {organisation:?} by {:?} ({})",
        caller.sub,
        caller.role.as_str()
    ));
}

fn internal(what: &str) -> impl Fn(String) -> ApiError + '_ {
    move |e| {
        log(&format!("{what}: {e}"));
        ApiError::Internal
    }
}

async fn list_webhooks(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.authorize(&headers, &org)?;
    let webhooks = app.store.list(&org).await?;
    let mut webhooks: Vec<Value> = webhooks.iter().map(public).collect();
    super::delivery_upkeep::add_disabled_reasons(&app.store, &org, &mut webhooks).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"webhooks": webhooks}),
    ))
}

async fn get_webhook(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.authorize(&headers, &org)?;
    if !is_webhook_id(&id) {
        return Err(ApiError::NotFound);
    }
    let webhook = app.store.get(&org, &id).await?.ok_or(ApiError::NotFound)?;
    let mut answer = [public(&webhook)];
    super::delivery_upkeep::add_disabled_reasons(&app.store, &org, &mut answer).await?;
    let [answer] = answer;
    Ok(json_response(StatusCode::OK, &answer))
}

async fn create_webhook(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = app.authorize(&headers, &org)?;
    let fields = read_fields(&body, &app.policy, true).map_err(ApiError::Invalid)?;
    let id = new_webhook_id().map_err(internal("new webhook id"))?;
    let key = new_api_key().map_err(internal("new API key"))?;
    let now = now_ms();
    let webhook = StoredWebhook {
        key_sealed: app.sealer.seal(&id, &key).map_err(internal("sealing"))?,
        id,
        organisation_id: org.clone(),
        name: fields.name.unwrap_or_default(),
        url: fields.url.unwrap_or_default(),
        description: fields.description.unwrap_or_default(),
        status: fields.status.unwrap_or_default(),
        events: fields.events.unwrap_or_default(),
        previous_key_sealed: None,
        previous_key_expires_ms: None,
        key_rotated_ms: None,
        created_ms: now,
        updated_ms: now,
    };
    check_entry_size(&webhook, None).map_err(too_large)?;
    let detail = json!({"name": webhook.name, "url": webhook.url, "status": webhook.status, "events": webhook.events});
    let written = app
        .store
        .put(
            &webhook,
            None,
            Audit {
                at_ms: now,
                actor: &caller.sub,
                role: caller.role.as_str(),
                action: "create",
                detail: detail.to_string(),
            },
        )
        .await?;
    if !written {
        let most = app.store.max_webhooks_per_organisation;
        return Err(ApiError::Invalid(vec![FieldError::new(
            "",
            format!(
                "organisation {org:?} already has {most} webhooks, the most allowed \
                 (--max-webhooks-per-organisation {most}): delete one first"
            ),
        )]));
    }
    audit_line(&caller, "created", &org, &webhook.id);
    let mut answer = public(&webhook);
    answer["apiKey"] = Value::String(key);
    Ok(json_response(StatusCode::CREATED, &answer))
}

fn too_large(message: String) -> ApiError {
    ApiError::Invalid(vec![FieldError::new("", message)])
}

/// Written, or why not: gone (404) or changed by a concurrent request (409).
async fn put_existing(
    app: &App,
    webhook: &StoredWebhook,
    old_key: &str,
    audit: Audit<'_>,
) -> Result<(), ApiError> {
    if app.store.put(webhook, Some(old_key), audit).await? {
        Ok(())
    } else if app
        .store
        .get(&webhook.organisation_id, &webhook.id)
        .await?
        .is_some()
    {
        Err(ApiError::Conflict)
    } else {
        Err(ApiError::NotFound)
    }
}

async fn update_webhook(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = app.authorize(&headers, &org)?;
    if !is_webhook_id(&id) {
        return Err(ApiError::NotFound);
    }
    let old = app.store.get(&org, &id).await?.ok_or(ApiError::NotFound)?;
    let fields = read_fields(&body, &app.policy, false).map_err(ApiError::Invalid)?;
    let mut webhook = old.clone();
    let mut changed = serde_json::Map::new();
    if let Some(v) = fields.name {
        changed.insert("name".into(), json!(v));
        webhook.name = v;
    }
    if let Some(v) = fields.url {
        changed.insert("url".into(), json!(v));
        webhook.url = v;
    }
    if let Some(v) = fields.description {
        changed.insert("description".into(), json!(v));
        webhook.description = v;
    }
    if let Some(v) = fields.status {
        changed.insert("status".into(), json!(v));
        webhook.status = v;
    }
    if let Some(v) = fields.events {
        changed.insert("events".into(), json!(v));
        webhook.events = v;
    }
    let now = now_ms();
    webhook.updated_ms = now;
    check_entry_size(&webhook, Some(&old)).map_err(too_large)?;
    put_existing(
        &app,
        &webhook,
        &old.key_sealed,
        Audit {
            at_ms: now,
            actor: &caller.sub,
            role: caller.role.as_str(),
            action: "update",
            detail: Value::Object(changed).to_string(),
        },
    )
    .await?;
    if old.status != "enabled" && webhook.status == "enabled" {
        super::delivery_upkeep::clear_health(&app.store, &id).await?;
    }
    audit_line(&caller, "updated", &org, &id);
    Ok(json_response(StatusCode::OK, &public(&webhook)))
}

async fn delete_webhook(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.authorize(&headers, &org)?;
    if !is_webhook_id(&id) {
        return Err(ApiError::NotFound);
    }
    let audit = Audit {
        at_ms: now_ms(),
        actor: &caller.sub,
        role: caller.role.as_str(),
        action: "delete",
        detail: "{}".into(),
    };
    if !app.store.delete(&org, &id, audit).await? {
        return Err(ApiError::NotFound);
    }
    audit_line(&caller, "deleted", &org, &id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn rotate_key(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.authorize(&headers, &org)?;
    if !is_webhook_id(&id) {
        return Err(ApiError::NotFound);
    }
    let old = app.store.get(&org, &id).await?.ok_or(ApiError::NotFound)?;
    let key = new_api_key().map_err(internal("new API key"))?;
    let now = now_ms();
    let expires = now.saturating_add(app.rotation_grace_ms);
    let mut webhook = old.clone();
    webhook.key_sealed = app.sealer.seal(&id, &key).map_err(internal("sealing"))?;
    // The key being replaced is still served to the proxies until `expires`; one rotated out earlier is dropped.
    webhook.previous_key_sealed = Some(old.key_sealed.clone());
    webhook.previous_key_expires_ms = Some(expires);
    webhook.key_rotated_ms = Some(now);
    webhook.updated_ms = now;
    check_entry_size(&webhook, Some(&old)).map_err(too_large)?;
    put_existing(
        &app,
        &webhook,
        &old.key_sealed,
        Audit {
            at_ms: now,
            actor: &caller.sub,
            role: caller.role.as_str(),
            action: "rotate-key",
            detail: json!({"previousKeyExpiresAt": rfc3339(expires)}).to_string(),
        },
    )
    .await?;
    audit_line(&caller, "rotated the key of", &org, &id);
    let mut answer = public(&webhook);
    answer["apiKey"] = Value::String(key);
    answer["previousKeyExpiresAt"] = Value::String(rfc3339(expires));
    Ok(json_response(StatusCode::OK, &answer))
}

/// Ends the previous key's grace at once (a key that leaked): the proxies stop signing with it at their next poll.
async fn revoke_previous_key(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.authorize(&headers, &org)?;
    if !is_webhook_id(&id) {
        return Err(ApiError::NotFound);
    }
    let old = app.store.get(&org, &id).await?.ok_or(ApiError::NotFound)?;
    let now = now_ms();
    let Some(expires) = old
        .previous_key_expires_ms
        .filter(|expires| old.previous_key_sealed.is_some() && now < *expires)
    else {
        return Err(ApiError::NoPreviousKey);
    };
    let mut webhook = old.clone();
    webhook.previous_key_sealed = None;
    webhook.previous_key_expires_ms = None;
    webhook.updated_ms = now;
    put_existing(
        &app,
        &webhook,
        &old.key_sealed,
        Audit {
            at_ms: now,
            actor: &caller.sub,
            role: caller.role.as_str(),
            action: "revoke-previous-key",
            detail:
                json!({"previousKeyExpiredAt": rfc3339(now), "graceWasUntil": rfc3339(expires)})
                    .to_string(),
        },
    )
    .await?;
    audit_line(&caller, "revoked the previous key of", &org, &id);
    Ok(json_response(StatusCode::OK, &public(&webhook)))
}

/// `GET /v1/settings`: what the dashboard needs to know of the registry's flags (no token).
async fn settings(State(app): State<Arc<App>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "eventTypes": app.policy.event_types,
            "rotationGraceSeconds": app.rotation_grace_ms / 1000,
        }),
    )
}

async fn event_types(State(app): State<Arc<App>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"eventTypes": app.policy.event_types}),
    )
}

async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &errors_body(&[FieldError::new("", "no such resource")]),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn dashboard_html() -> Response {
    asset("text/html; charset=utf-8", DASHBOARD_HTML)
}

async fn dashboard_js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn dashboard_css() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}
