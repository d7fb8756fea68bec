//! Which optional routes the daemon has, read once at start from its `GET /openapi.json` (as the
//! Python SDK does, `sdk/python/src/hearth/_features.py`): a tool whose route is missing is not
//! offered at all, rather than offered and failing with a bare 404. Pure data once fetched.

use std::collections::BTreeSet;

/// An optional route: method (lowercase) and path template.
pub type Route = (&'static str, &'static str);

pub const RUN_CODE: Route = ("post", "/v1/sandboxes/{id}/code");
pub const PAUSE: Route = ("post", "/v1/sandboxes/{id}/pause");
pub const RESUME: Route = ("post", "/v1/sandboxes/{id}/resume");
pub const SET_NETWORK: Route = ("put", "/v1/sandboxes/{id}/network");
pub const FORK: Route = ("post", "/v1/sandboxes/{id}/fork");
pub const PROCESSES: Route = ("post", "/v1/sandboxes/{id}/processes");

/// The routes an OpenAPI document lists, with path parameter names erased.
#[derive(Debug, Default)]
pub struct Features {
    routes: BTreeSet<(String, String)>,
}

impl Features {
    pub fn from_openapi(document: &serde_json::Value) -> Features {
        let mut routes = BTreeSet::new();
        if let Some(paths) = document.get("paths").and_then(|p| p.as_object()) {
            for (path, item) in paths {
                for method in item.as_object().into_iter().flat_map(|m| m.keys()) {
                    routes.insert((method.to_ascii_lowercase(), shape(path)));
                }
            }
        }
        Features { routes }
    }

    pub fn has(&self, (method, path): Route) -> bool {
        self.routes.contains(&(method.to_string(), shape(path)))
    }
}

/// `/a/{id}/b` and `/a/{sid}/b` are one route.
fn shape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_whatever_their_parameters_are_called() {
        let doc = serde_json::json!({"paths": {
            "/v1/sandboxes/{sandbox}/pause": {"post": {}},
            "/v1/sandboxes/{id}/network": {"get": {}, "put": {}},
        }});
        let features = Features::from_openapi(&doc);
        assert!(features.has(PAUSE));
        assert!(features.has(SET_NETWORK));
        assert!(!features.has(RESUME));
        assert!(!features.has(RUN_CODE));
        assert!(!Features::from_openapi(&serde_json::json!({})).has(PAUSE));
    }
}
