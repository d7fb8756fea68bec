//! Firecracker's Swagger 2.0 description as JSON Schema (draft 4, which Swagger 2.0 schemas nearly
//! are): `x-*` extensions dropped, `$ref: '#/definitions/X'` resolved against the copied definitions,
//! and objects closed (`additionalProperties: false` where the schema says nothing), because
//! Firecracker deserializes its request bodies with `deny_unknown_fields`: a misspelt field is an
//! error there, so it must be one here. Request bodies are matched to their definition through the
//! document's own `paths`, so no mapping is copied by hand.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

pub struct FirecrackerSchema {
    /// The whole document, converted.
    doc: Value,
}

impl FirecrackerSchema {
    /// Loads `shared/firecracker/firecracker-api.yaml` beside the repository, or panics saying where
    /// it was looked for.
    pub fn load() -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/firecracker/firecracker-api.yaml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "Firecracker's API schema {} is missing ({e}): these tests validate every request \
                 against it; restore the shared/ directory beside the repository",
                path.display()
            )
        });
        let raw: Value = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        let mut doc = raw.clone();
        let definitions = raw["definitions"]
            .as_object()
            .expect("the swagger document has definitions")
            .iter()
            .map(|(name, schema)| (name.clone(), convert(schema)))
            .collect::<Map<_, _>>();
        doc["definitions"] = Value::Object(definitions);
        FirecrackerSchema { doc }
    }

    pub fn definition_names(&self) -> Vec<String> {
        self.doc["definitions"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    /// A validator for `schema` (which may `$ref` definitions).
    pub fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut root = convert(schema);
        root["definitions"] = self.doc["definitions"].clone();
        jsonschema::draft4::new(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    /// Validates `instance` against the definition `name`; the errors, one per line, on failure.
    pub fn validate(&self, name: &str, instance: &Value) -> Result<(), String> {
        assert!(
            self.doc["definitions"].get(name).is_some(),
            "Firecracker's schema has no definition {name}"
        );
        errors(
            &self.validator(&json!({ "$ref": format!("#/definitions/{name}") })),
            instance,
        )
    }

    /// Validates a request against the body schema the document's `paths` give for it; fails if
    /// the method and path are not part of Firecracker's API or a body is missing or unexpected.
    pub fn validate_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let operation = self
            .operation(method, path)
            .ok_or_else(|| format!("{method} {path} is not in Firecracker's API"))?;
        let body_schema = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["in"] == "body")
            .map(|p| &p["schema"]);
        match (body_schema, body) {
            (Some(schema), Some(body)) => errors(&self.validator(schema), body)
                .map_err(|e| format!("{method} {path} body {body}:\n{e}")),
            (Some(_), None) => Err(format!("{method} {path} needs a body")),
            (None, Some(body)) => Err(format!("{method} {path} takes no body, got {body}")),
            (None, None) => Ok(()),
        }
    }

    /// The schema of a property of a definition (e.g. `FullVmConfiguration` / `boot-source`).
    pub fn property_schema(&self, definition: &str, property: &str) -> Option<&Value> {
        self.doc["definitions"][definition]["properties"].get(property)
    }

    /// The operation object for a concrete path, matching `{param}` segments of the templates.
    fn operation(&self, method: &str, path: &str) -> Option<&Value> {
        let concrete: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()?
            .iter()
            .find(|(template, _)| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == concrete.len()
                    && parts.iter().zip(&concrete).all(|(t, c)| {
                        t == c || (t.starts_with('{') && t.ends_with('}') && !c.is_empty())
                    })
            })
            .and_then(|(_, item)| item.get(method.to_ascii_lowercase()))
    }
}

fn errors(validator: &jsonschema::Validator, instance: &Value) -> Result<(), String> {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("  at {:?}: {e}", e.instance_path.to_string()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// One Swagger schema object to JSON Schema draft 4. Recurses only through keywords whose values are
/// schemas, so property *names* (Metrics has a property called `properties`) are never mistaken for
/// keywords.
pub fn convert(schema: &Value) -> Value {
    let Some(object) = schema.as_object() else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in object {
        let converted = match key.as_str() {
            k if k.starts_with("x-") => continue,
            // Swagger-only annotations with no JSON Schema meaning.
            "discriminator" | "readOnly" | "xml" | "externalDocs" | "example" => continue,
            // `required:` with no list (MmdsConfig) means nothing is required.
            "required" if !value.is_array() => continue,
            "properties" => Value::Object(
                value
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, s)| (name.clone(), convert(s)))
                    .collect(),
            ),
            "items" | "additionalProperties" | "not" => convert(value),
            "allOf" | "anyOf" | "oneOf" => Value::Array(
                value
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(convert)
                    .collect(),
            ),
            _ => value.clone(),
        };
        out.insert(key.clone(), converted);
    }
    if out.contains_key("properties") && !out.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}
