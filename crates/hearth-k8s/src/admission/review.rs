//! The `admission.k8s.io/v1` `AdmissionReview` wire types, only the fields the node-confinement
//! decision reads (unknown fields are ignored, so newer API servers' additions do not break parsing).
//! Objects stay `serde_json::Value`: the decision compares them as sent, without a typed round trip
//! that could drop or default a field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An `AdmissionReview` as the API server sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    pub request: Option<AdmissionRequest>,
}

/// The resource a request is about (`group` is empty for the core group).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
}

/// Who is asking, as the API server authenticated them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// `CREATE`, `UPDATE`, `DELETE` or `CONNECT` (patches arrive as `UPDATE`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

/// One request under review.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub resource: GroupVersionResource,
    /// `status` for writes to the status subresource; empty for the object itself.
    #[serde(default)]
    pub sub_resource: String,
    /// Empty on a CREATE whose object has only `generateName`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    pub operation: Operation,
    #[serde(default)]
    pub user_info: UserInfo,
    /// The object after the write (absent on DELETE).
    #[serde(default)]
    pub object: Option<Value>,
    /// The object before the write (UPDATE and DELETE).
    #[serde(default)]
    pub old_object: Option<Value>,
}

/// The answer: `AdmissionReview` with `response` set.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReviewResponse {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub response: AdmissionResponse,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ResponseStatus>,
}

/// The part of a `metav1.Status` the API server shows the client when a request is denied.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseStatus {
    pub code: u16,
    pub message: String,
}

impl AdmissionReviewResponse {
    /// The answer to request `uid`: allowed, or denied with 403 and `reason` (the client sees
    /// `admission webhook "..." denied the request: <reason>`).
    pub fn new(uid: String, verdict: Result<(), String>) -> Self {
        let (allowed, status) = match verdict {
            Ok(()) => (true, None),
            Err(message) => (false, Some(ResponseStatus { code: 403, message })),
        };
        AdmissionReviewResponse {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            response: AdmissionResponse {
                uid,
                allowed,
                status,
            },
        }
    }
}
