//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the wire
//! types' schemas, served at `/openapi.json` and checked in as `crates/hearth/openapi.json`
//! (regenerate: `hearth serve --print-openapi > crates/hearth/openapi.json`; a test fails on drift).
//! Client generators read it: each operation has its own camelCase `operationId`, a tag, every
//! status it can answer (errors as `ErrorBody`) and its headers; raw bytes are [`Binary`]
//! (`type: string, format: binary`). `tests/openapi_clients.rs` validates it and generates a
//! client from it.

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
        super::sandboxes::update,
        super::sandboxes::delete,
        super::lifecycle::pause,
        super::lifecycle::resume,
        super::lifecycle::fork,
        super::exec::exec,
        super::exec::exec_ws,
        super::code::run,
        super::code::reset,
        super::processes::start,
        super::processes::list,
        super::processes::get,
        super::processes::output,
        super::processes::stdin,
        super::processes::signal,
        super::processes::remove,
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
        api::WsTerminal,
        api::TerminalSize,
        api::FileWritten,
        api::DirListing,
        api::DirEntry,
        api::RunBody,
        api::RunResult,
        api::ErrorBody,
        api::Health,
        super::network::SandboxNetwork,
        super::lifecycle::PauseSandbox,
        super::lifecycle::ForkSandbox,
        super::sandboxes::UpdateSandbox,
        super::code::RunCode,
        super::code::CodeResult,
        super::code::CodeRunError,
        super::processes::StartProcess,
        super::processes::Process,
        super::processes::ProcessList,
        super::processes::ProcessStdin,
        super::processes::ProcessSignal,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "sandboxes", description = "Create, list, inspect, pause, resume and delete sandboxes"),
        (name = "exec", description = "Commands in a running sandbox"),
        (name = "code", description = "Code run in an interpreter the sandbox keeps between calls"),
        (name = "processes", description = "Background processes: started, then read, written to, signalled and removed \
            by later calls"),
        (name = "files", description = "Files in and out of a running sandbox"),
        (name = "network", description = "A running sandbox's egress policy and network activity"),
        (name = "ports", description = "HTTP and raw TCP to ports inside a running sandbox"),
        (name = "runs", description = "One command in a throwaway sandbox"),
        (name = "node", description = "Health and metrics (no token)"),
    )
)]
struct ApiDoc;

// Raw bytes in a body (a file's content, a proxied request or answer) as `type: string, format:
// binary`, which generators turn into a file or bytes (a `Vec<u8>` would be an array of integers).
// Only named in annotations: `inline(super::openapi::Binary)`. (A `///` comment here would become
// the schema's description in every body.)
/// Raw bytes.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // a schema only, never built
pub struct Binary(Vec<u8>);

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

    /// Every operation as (method, path, operation).
    fn operations(doc: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
        let mut all = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                all.push((method.clone(), path.clone(), op.clone()));
            }
        }
        all
    }

    /// Client generators name their functions after operationIds: each must be unique, camelCase
    /// and say what it does (two operations called `get` broke generators before).
    #[test]
    fn operation_ids_are_unique_and_meaningful() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let generic = [
            "get", "list", "create", "put", "delete", "exec", "exec_ws", "run", "proxy", "tunnel",
            "metrics", "healthz", "post", "patch", "update",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(
                id.len() > 6
                    && id.starts_with(|c: char| c.is_ascii_lowercase())
                    && id.chars().all(|c| c.is_ascii_alphanumeric()),
                "{method} {path}: operationId {id:?} is not a camelCase name"
            );
            assert!(
                !generic.contains(&id),
                "{method} {path}: generic operationId {id:?}"
            );
            assert!(seen.insert(id.to_string()), "operationId {id:?} used twice");
        }
        for id in [
            "createSandbox",
            "execInSandbox",
            "putSandboxFile",
            "getHealth",
        ] {
            assert!(seen.contains(id), "{id} missing from {seen:?}");
        }
    }

    /// What a generated client relies on: a tag per operation, the bearer requirement on every
    /// `/v1` route, an `ErrorBody` for every JSON error answer, the `Retry-After` header wherever an
    /// answer says it carries one, `x-hearth-mode` on downloads, and raw bytes as `format: binary`
    /// (never an array of integers).
    #[test]
    fn operations_document_tags_security_errors_headers_and_bytes() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        for (method, path, op) in operations(&doc) {
            let at = format!("{method} {path}");
            assert!(
                op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                "{at}: no tag"
            );
            if path.starts_with("/v1/") {
                assert_eq!(op["security"], serde_json::json!([{"bearer": []}]), "{at}");
                assert!(op["responses"]["401"].is_object(), "{at}: no 401");
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                let content = &response["content"];
                if status.starts_with('4') || status.starts_with('5') {
                    let json = &content["application/json"]["schema"]["$ref"];
                    let text = &content["text/plain"];
                    assert!(
                        json == "#/components/schemas/ErrorBody" || text.is_object(),
                        "{at} {status}: no ErrorBody"
                    );
                }
                let says_retry = response["description"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("Retry-After");
                assert_eq!(
                    says_retry,
                    response["headers"]["Retry-After"].is_object(),
                    "{at} {status}: Retry-After in the description and the headers disagree"
                );
            }
            let bodies = op["requestBody"]["content"].as_object().into_iter().chain(
                op["responses"]
                    .as_object()
                    .unwrap()
                    .values()
                    .filter_map(|r| r["content"].as_object()),
            );
            for content in bodies {
                for (media, body) in content {
                    let schema = body["schema"].to_string();
                    if media == "application/octet-stream" || media == "application/x-ndjson" {
                        assert!(
                            schema.contains(r#""format":"binary""#) && !schema.contains("array"),
                            "{at}: {media} is not raw bytes as format: binary: {schema}"
                        );
                    }
                }
            }
        }
        for (path, status) in [
            ("/v1/sandboxes", "503"),
            ("/v1/sandboxes/{id}/exec", "429"),
            ("/v1/runs", "503"),
        ] {
            let response = &doc["paths"][path]["post"]["responses"][status];
            assert!(
                response["headers"]["Retry-After"].is_object(),
                "post {path} {status}: no Retry-After"
            );
        }
        let download = &doc["paths"]["/v1/sandboxes/{id}/files"]["get"]["responses"]["200"];
        assert!(download["headers"]["x-hearth-mode"].is_object());
        assert_eq!(
            download["content"]["application/octet-stream"]["schema"]["format"],
            "binary"
        );
    }
}
