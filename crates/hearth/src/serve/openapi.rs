//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the wire
//! types' schemas, served at `/openapi.json` and checked in as `crates/hearth/openapi.json`
//! (regenerate: `hearth serve --print-openapi > crates/hearth/openapi.json`; a test fails on drift).

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hearth node API",
        description = "Long-lived microVM sandboxes on one node: create, exec (streamed), files, one-shot runs. \
            Every /v1 route takes `Authorization: Bearer <token>`; a tenant sees only its own sandboxes. \
            Errors are `{\"error\": \"...\", \"code\": \"...\"}`."
    ),
    paths(
        super::sandboxes::create,
        super::sandboxes::list,
        super::sandboxes::get,
        super::sandboxes::delete,
        super::exec::exec,
        super::exec::exec_ws,
        super::files::put,
        super::files::get,
        super::network::get,
        super::network::put,
        super::ports::proxy,
        super::ports::tunnel,
        super::runs::run,
        super::healthz,
        super::metrics::metrics,
    ),
    components(schemas(
        api::CreateSandbox,
        api::SandboxState,
        api::Sandbox,
        api::SandboxList,
        api::ExecBody,
        api::ExecEvent,
        api::WsControl,
        api::FileWritten,
        api::DirListing,
        api::DirEntry,
        api::RunBody,
        api::RunResult,
        api::ErrorBody,
        api::Health,
        super::network::SandboxNetwork,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "sandboxes", description = "Create, list, inspect and delete sandboxes"),
        (name = "exec", description = "Commands in a running sandbox"),
        (name = "files", description = "Files in and out of a running sandbox"),
        (name = "network", description = "A running sandbox's egress policy and network activity"),
        (name = "ports", description = "HTTP and raw TCP to ports inside a running sandbox"),
        (name = "runs", description = "One command in a throwaway sandbox"),
        (name = "node", description = "Health and metrics (no token)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as pretty JSON with a trailing newline (the checked-in file's exact bytes).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    // The crate version would make every release a drift; the API has its own.
    doc.info.version = "1".to_string();
    let mut text = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}

#[cfg(test)]
mod tests {
    /// The checked-in document is what the code generates. On failure, regenerate it:
    /// `cargo run -p hearth -- serve --print-openapi > crates/hearth/openapi.json`.
    #[test]
    fn checked_in_document_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        let generated = super::document();
        assert!(
            checked_in == generated,
            "{path} is out of date with the code: run \
             `cargo run -p hearth -- serve --print-openapi > crates/hearth/openapi.json`"
        );
    }

    #[test]
    fn document_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        for path in [
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/exec/ws",
            "/v1/sandboxes/{id}/files",
            "/v1/runs",
            "/healthz",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }
}
